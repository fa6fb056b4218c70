"""Pictures of runs and caches (matplotlib, the ``plots`` extra): ``distill report`` and ``distill inspect --plot``.

:func:`run_series` reads a student run folder (``metrics.jsonl``, ``eval.json``) into the
series a picture shows; :func:`draw_runs` draws one or more runs overlaid, and
:func:`draw_cache` a cache's captured mass, teacher entropy and bytes per column from
:func:`pipeline.report.cache_report`. :func:`save` writes a figure as ``.png``, ``.svg``,
``.pdf`` or a self-contained ``.html`` page.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.run_folder import EVAL_NAME, METRICS_NAME

FORMATS = (".png", ".svg", ".pdf", ".html")
# Curves of the loss panel and of the monitoring panel, as metrics.jsonl names them.
LOSS_FIELDS = ("loss", "kd", "ce")
MONITOR_FIELDS = ("kl_t1", "top1_agreement")


@dataclass
class RunSeries:
    """What a run's picture shows: each logged field by step, and the held-out evaluation, if any."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    evaluation: dict[str, float] | None = None

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one field, over the steps that logged a number for it."""
        pairs = [(step, value) for step, value in zip(self.steps, self.values.get(name, [])) if value == value]
        return [step for step, _ in pairs], [value for _, value in pairs]


def run_series(folder: str | Path, name: str | None = None) -> RunSeries:
    """Read a student run folder; raise :class:`~pipeline.errors.ConfigError` naming what is missing."""
    folder = Path(folder)
    metrics = folder / METRICS_NAME
    if not metrics.is_file():
        raise ConfigError(f"'{folder}' holds no {METRICS_NAME}; give the --out folder of a student-train run")
    run = RunSeries(name or folder.name)
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"'{metrics}' line {number} is not a metrics record") from None
        run.steps.append(step)
        for key in (*LOSS_FIELDS, *MONITOR_FIELDS, "lr", "temperature"):
            value = record.get(key)
            run.values.setdefault(key, []).append(float(value) if isinstance(value, (int, float)) else math.nan)
    evaluation = folder / EVAL_NAME
    if evaluation.is_file():
        try:
            scores = json.loads(evaluation.read_text())
            if not isinstance(scores, dict):
                raise TypeError("not an object")
            run.evaluation = {key: float(scores[key]) for key in ("kl", "ce", "perplexity") if key in scores}
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"'{evaluation}' is not the held-out results of a student-train run") from None
    return run


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("drawing needs matplotlib; pip install 'distill-cache[plots]'") from None
    return plt


def draw_runs(runs: list[RunSeries]) -> Any:
    """A figure of 2 x 2 panels, every run overlaid in its own colour: the loss, KD and CE terms (held-out
    CE as a point at the last step); KL at T = 1 (held-out KL as a point); top-1 agreement; the learning rate."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = {"loss": axes[0][0], "kl": axes[0][1], "agreement": axes[1][0], "lr": axes[1][1]}
    styles = {"loss": "-", "kd": "--", "ce": ":"}
    for index, run in enumerate(runs):
        colour = f"C{index}"
        for key in LOSS_FIELDS:
            steps, values = run.series(key)
            if steps:
                panels["loss"].plot(steps, values, styles[key], color=colour, label=f"{run.name}: {key}")
        for key, panel in (("kl_t1", "kl"), ("top1_agreement", "agreement"), ("lr", "lr")):
            steps, values = run.series(key)
            if steps:
                panels[panel].plot(steps, values, "-", color=colour, label=run.name)
        if run.evaluation and run.steps:
            last = run.steps[-1]
            if "ce" in run.evaluation:
                panels["loss"].plot([last], [run.evaluation["ce"]], "o", color=colour, label=f"{run.name}: held-out CE")
            if "kl" in run.evaluation:
                panels["kl"].plot([last], [run.evaluation["kl"]], "o", color=colour, label=f"{run.name}: held-out")
    titles = {
        "loss": ("training loss (KD, CE terms)", "loss"),
        "kl": ("KL(teacher ‖ student) at T = 1", "KL (nats)"),
        "agreement": ("top-1 agreement with the teacher", "fraction"),
        "lr": ("learning rate", "lr"),
    }
    for key, panel in panels.items():
        title, ylabel = titles[key]
        panel.set_title(title)
        panel.set_xlabel("step")
        panel.set_ylabel(ylabel)
        panel.grid(alpha=0.3)
        if panel.lines:
            panel.legend(fontsize=7)
    return figure


def draw_cache(report: dict[str, Any]) -> Any:
    """A figure of 3 panels from :func:`pipeline.report.cache_report`: captured mass per position,
    teacher entropy per row, bytes per token by column."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    mass = report.get("captured_mass_histogram")
    if mass:
        _bars(axes[0], mass, "captured probability mass per position", "mass")
    else:
        axes[0].set_title("captured mass: the capture stores no log-probabilities")
    entropy = report.get("teacher_entropy_histogram")
    if entropy:
        _bars(axes[1], entropy, "teacher entropy per row (mean over positions)", "nats")
    else:
        axes[1].set_title("teacher entropy: the cache holds no row statistics")
    columns = report["column_bytes_per_token"]
    axes[2].bar(list(columns), list(columns.values()), color="C2")
    axes[2].set_title(f"bytes per token by column ({report['bytes_per_token']:.1f} in all, with Arrow's)")
    axes[2].set_ylabel("bytes per token")
    axes[2].tick_params(axis="x", rotation=45)
    return figure


def _bars(axis: Any, histogram: dict[str, list[float]], title: str, xlabel: str) -> None:
    edges, counts = histogram["edges"], histogram["counts"]
    widths = [b - a for a, b in itertools.pairwise(edges)]
    axis.bar(edges[:-1], counts, width=widths, align="edge", color="C0")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")


def save(figure: Any, out: str | Path, caption: str = "") -> Path:
    """Write ``figure`` to ``out`` (its suffix picks the format; ``.html`` embeds a PNG); return the path."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out '{out}' should end in one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    try:
        if out.suffix.lower() == ".html":
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110)
            image = base64.b64encode(buffer.getvalue()).decode("ascii")
            page = (
                "<!doctype html>\n<meta charset='utf-8'>\n<title>distill report</title>\n"
                f"<p>{html.escape(caption)}</p>\n<img alt='report' src='data:image/png;base64,{image}'>\n"
            )
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(page)
            tmp.replace(out)
        else:
            tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
            figure.savefig(tmp, dpi=110)
            tmp.replace(out)
    finally:
        plt.close(figure)
    return out
