"""Run configs: ``--config FILE`` for ``teacher-cache`` and ``student-train`` (a YAML or JSON mapping).

The file's keys are the names of the pass's config fields (``pipeline.config``:
``top_k``, ``seq_len``, ``alpha``, ...); its values become the command's defaults, so any
flag given on the command line overrides the file, and a list given on the command line
(``--student-config``, ``--cache``) replaces the file's list. An unknown key, a value of
the wrong kind or a file that is not a mapping is refused in one line naming it.
``data/configs/`` has commented examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

MAX_CONFIG_BYTES = 1 << 20
# Config fields whose command-line parameter has another name, per command.
PARAMETER_OF_FIELD = {"student-train": {"cache": "caches", "ensemble_caches": "caches"}}


def read_mapping(path: str) -> dict[str, Any]:
    """The file's top-level mapping; YAML (a superset of JSON) when PyYAML is installed, else JSON."""
    file = Path(path)
    if not file.is_file():
        raise click.ClickException(f"--config '{path}' is not a file")
    data = file.read_bytes()[: MAX_CONFIG_BYTES + 1]
    if len(data) > MAX_CONFIG_BYTES:
        raise click.ClickException(f"--config '{path}' is over {MAX_CONFIG_BYTES} bytes; a run config is small")
    text = data.decode("utf-8", errors="replace")
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers
        yaml = None
    try:
        mapping = yaml.safe_load(text) if yaml is not None else json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"--config '{path}' does not parse ({first})") from None
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise click.ClickException(
            f"--config '{path}' holds a {type(mapping).__name__}; it must map field names to values"
        )
    return mapping


def command_defaults(path: str, command: click.Command) -> dict[str, Any]:
    """``--config``'s mapping as ``command``'s ``default_map``: field names checked and turned into parameter names."""
    renamed = PARAMETER_OF_FIELD.get(command.name or "", {})
    parameters = {
        param.name: param
        for param in command.params
        if isinstance(param, click.Option) and param.name and param.expose_value and param.name != "config"
    }
    defaults: dict[str, Any] = {}
    for key, value in read_mapping(path).items():
        name = renamed.get(str(key), str(key))
        if not isinstance(key, str) or name not in parameters:
            known = sorted(
                {*(field for field in renamed), *(name for name in parameters if name not in renamed.values())}
            )
            raise click.ClickException(
                f"--config '{path}': unknown key {key!r} for {command.name}; the keys are the config's field names: "
                + ", ".join(known)
            )
        param = parameters[name]
        if param.multiple:
            items = [checked(path, key, param, item) for item in (value if isinstance(value, list) else [value])]
            earlier = defaults.get(name, [])
            defaults[name] = [*earlier, *items] if key == "ensemble_caches" else [*items, *earlier]
        else:
            defaults[name] = checked(path, key, param, value)
    return defaults


def checked(path: str, key: str, param: click.Option, value: Any) -> Any:
    """One value of the file as the parameter's type; a list of numbers for a text option becomes ``1,2,3``."""
    if isinstance(value, list) and param.type is click.STRING and all(isinstance(v, (int, float)) for v in value):
        value = ",".join(str(v) for v in value)
    if isinstance(value, (list, dict)):
        raise click.ClickException(f"--config '{path}': {key} takes one value, not a {type(value).__name__}")
    if value is None:
        return None
    try:
        return param.type.convert(value, param, None)
    except click.BadParameter as exc:
        raise click.ClickException(f"--config '{path}': {key}: {exc.message}") from None


def config_option(command: click.Command) -> click.Command:
    """Add ``--config FILE`` to ``command``: read first (eager), its mapping becomes the defaults."""

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **command_defaults(value, ctx.command)}

    return click.option(
        "--config",
        "config",
        is_eager=True,
        expose_value=False,
        callback=load,
        metavar="FILE",
        help="YAML or JSON file of settings, keyed by field name (e.g. top_k: 64); flags given here override it.",
    )(command)
