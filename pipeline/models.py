"""Loading teachers, students and tokenizers, and running an LM head over chunks.

A *source* is a Hub id, a local folder, or a local ``.gguf`` file. Local paths are tried
first; anything else is handed to ``from_pretrained`` as a Hub id.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, DistillError, SourceNotFoundError, TeacherError, first_line
from pipeline.fingerprint import config_fingerprint, files_fingerprint
from pipeline.hash_cache import cached_sha256

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Output transforms that some architectures apply after the LM head, as config fields.
SOFTCAP_FIELDS = ("final_logit_softcapping",)
MULTIPLY_FIELDS = ("logit_scale",)
DIVIDE_FIELDS = ("logits_scaling",)


@dataclass(frozen=True)
class Source:
    """Where a model or tokenizer comes from.

    Attributes:
        location: what ``from_pretrained`` receives (a folder or a Hub id).
        gguf_file: file name inside ``location`` when the source is a GGUF file.
        is_local: whether the source is on this machine.
        display: a name without absolute paths, safe to put in a manifest.
    """

    location: str
    gguf_file: str | None
    is_local: bool
    display: str


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path rather than a Hub id (``org/name``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_source(spec: str, role: str) -> Source:
    """Interpret ``spec`` as a ``.gguf`` file, a local folder or a Hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise SourceNotFoundError(
                    f"{role} '{spec}' is a file but not a .gguf; give a model folder, a .gguf file or a Hub id"
                )
            return Source(str(path.parent), path.name, True, path.name)
        if not (path / "config.json").exists() and (path / "checkpoints").is_dir():
            raise SourceNotFoundError(
                f"{role} '{spec}' is a student-train folder whose run has not finished (checkpoints, no final "
                "model); let it finish, or finish it with student-train --resume, then use the folder"
            )
        return Source(str(path), None, True, path.resolve().name)
    if looks_like_path(spec) or spec.endswith(".gguf"):
        raise SourceNotFoundError(f"{role} path '{spec}' does not exist; check the path")
    return Source(spec, None, False, spec)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks cuda, else mps, else cpu."""
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device auto")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype asked for, else bf16 on CUDA and fp32 elsewhere.

    fp32 on CPU on purpose: bf16 matrix products there fall back to a slow kernel.
    """
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _load_error(role: str, source: Source, exc: Exception) -> SourceNotFoundError:
    where = "local" if source.is_local else "Hub"
    if "trust_remote_code" in str(exc):
        return SourceNotFoundError(
            f"{role} '{source.display}' needs to run its own model code; "
            "pass --trust-remote-code if you trust that code"
        )
    return SourceNotFoundError(
        f"cannot load {role} from {where} source '{source.display}' ({first_line(exc)}); "
        "check the path or Hub id, and network access for Hub ids"
    )


def load_tokenizer(spec: str | Source, role: str = "tokenizer", trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a folder, a ``.gguf`` file or a Hub id.

    Whatever loading raises becomes a :class:`SourceNotFoundError`: the ``tokenizers``
    backend reports a malformed ``tokenizer.json`` as a plain ``Exception``.
    """
    from transformers import AutoTokenizer

    source = spec if isinstance(spec, Source) else resolve_source(spec, role)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoTokenizer.from_pretrained(source.location, **kwargs)
    except DistillError:
        raise
    except Exception as exc:
        raise _load_error(f"{role} tokenizer", source, exc) from exc


def load_config(source: Source, role: str, trust_remote_code: bool = False) -> Any:
    """The model config, without loading weights."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error(f"{role} config", source, exc) from None


def logit_width(config: Any) -> int:
    """Number of logits the model produces per position (what ids index)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(text_config, "vocab_size", None)
    if not isinstance(width, int) or width <= 0:
        raise ConfigError("the model config has no vocab_size; cannot tell the logit width")
    return width


def max_positions(config: Any) -> int | None:
    """The config's ``max_position_embeddings`` (or its alias, e.g. GPT-2's ``n_positions``), if it has one."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def has_learned_positions(model: nn.Module) -> bool:
    """Whether ``model`` looks positions up in a learned table, which has no row past its limit.

    True where the config says ``position_embedding_type="absolute"`` or where an
    ``nn.Embedding`` other than the input embedding has as many rows as the position limit
    (GPT-2's ``wpe``; OPT's ``embed_positions`` adds an offset of 2). Rotary and ALiBi models
    have no such table: they run past the limit, usually worse.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "position_embedding_type", None) == "absolute":
        return True
    limit = max_positions(model.config)
    if limit is None:
        return False
    inputs = model.get_input_embeddings()
    return any(
        isinstance(module, nn.Embedding) and module is not inputs and limit <= module.num_embeddings <= limit + 2
        for module in model.modules()
    )


def load_teacher(
    source: Source,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    gpus: list[int] | None = None,
) -> nn.Module:
    """The teacher in eval mode on ``device``.

    On CUDA with accelerate present the weights are placed by ``device_map``: with ``gpus``
    (a torchrun process's slice of the node) on those GPUs alone, one whole or spread over
    several; without, ``auto`` over every visible GPU (and the CPU if needed).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    use_device_map = device.type == "cuda" and _has_accelerate()
    if use_device_map and gpus and len(gpus) == 1:
        kwargs["device_map"] = {"": gpus[0]}
    elif use_device_map and gpus:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}  # no other GPU, no CPU
    elif use_device_map:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ImportError as exc:  # e.g. a GGUF file needs the gguf and accelerate packages
        raise SourceNotFoundError(
            f"loading teacher '{source.display}' needs a package that is missing ({exc}); "
            "install the extra: pip install '.[gguf]'"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error("teacher", source, exc) from None
    if not use_device_map:
        model.to(device)
    model.eval()
    return model


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def teacher_identity(source: Source, config: Any) -> dict[str, Any]:
    """The teacher's identity: Hub commit where it came from the Hub, else a hash of its weight files."""
    identity: dict[str, Any] = {
        "source": source.display,
        "model_type": getattr(config, "model_type", None),
        "config_sha256": config_fingerprint(config),
    }
    if source.gguf_file:
        identity["weights_sha256"] = cached_sha256(Path(source.location) / source.gguf_file)
        identity["revision"] = None
    elif source.is_local:
        weights = [p for p in sorted(Path(source.location).iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        identity["weights_sha256"] = files_fingerprint(weights, hasher=cached_sha256)
        identity["revision"] = None
    else:
        commit = hub_commit(source.location)
        if not commit:
            raise TeacherError(
                f"cannot tell which Hub commit of '{source.display}' was loaded; pin it with a local copy"
            )
        identity["revision"] = commit
        identity["weights_sha256"] = None
    return identity


def hub_commit(repo_id: str) -> str | None:
    """The commit of ``repo_id`` that the local Hub cache holds (what ``from_pretrained`` just used)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    if "snapshots" not in parts:
        return None
    commit = parts[parts.index("snapshots") + 1]
    return commit if len(commit) == 40 else None


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["hidden_size=128", "tie_word_embeddings=true"]`` -> dict, values parsed as JSON where they parse."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--student-config '{pair}' is not key=value; write e.g. hidden_size=128")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


JSON_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),
    ((int, float), "number"),
    (str, "string"),
    ((list, tuple), "list"),
    (dict, "object"),
    (type(None), "null"),
)


def _json_kind(value: Any) -> str:
    return next((name for kind, name in JSON_KINDS if isinstance(value, kind)), type(value).__name__)


def check_override(config: Any, key: str, value: Any) -> None:
    """Refuse an override for a field the config lacks, or of another JSON type than the field's value.

    A field that is ``null`` takes any value; ints and floats are both numbers (the
    model's own checks catch a fractional layer count).
    """
    if not hasattr(config, key):
        raise ConfigError(f"--student-config {key}=...: the {config.model_type} config has no field '{key}'")
    current = getattr(config, key)
    if current is None or _json_kind(current) == _json_kind(value):
        return
    raise ConfigError(
        f"--student-config {key}={json.dumps(value)[:40]}: the {config.model_type} config's '{key}' is a "
        f"{_json_kind(current)}, got a {_json_kind(value)}; give e.g. {key}={json.dumps(current)[:40]}"
    )


def _build_from_config(config: Any, overrides: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """Apply ``overrides`` to ``config`` and build a fresh fp32 model; any failure is a :class:`ConfigError`."""
    from transformers import AutoModelForCausalLM

    for key, value in overrides.items():
        check_override(config, key, value)
    given = " ".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())
    try:
        for key, value in overrides.items():
            setattr(config, key, value)
        # The config's own dtype (often bf16) would make CPU training crawl: choose fp32.
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except DistillError:
        raise
    except Exception as exc:  # configs and model constructors raise anything from ValueError to ZeroDivisionError
        where = f"with --student-config {given}" if overrides else "from its config"
        raise ConfigError(f"the student cannot be built {where} ({first_line(exc, 120)}); check those values") from exc


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir())


def load_student(
    spec: str, overrides: dict[str, Any], device: torch.device, trust_remote_code: bool = False
) -> tuple[nn.Module, str]:
    """The student in fp32 on ``device``, and how it was made (``pretrained`` or ``config``).

    A folder (or a ``config.json`` file) without weights builds a fresh model from its
    config with ``overrides`` applied; a folder with weights or a Hub id loads them (and
    then refuses overrides, which would not match the weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent if path.name == "config.json" else path
    from_config = path.exists() and (path.is_file() or not has_weights(path))
    if from_config:
        try:
            if path.is_file():
                config = AutoConfig.from_pretrained(
                    str(path.parent), config_file_name=path.name, trust_remote_code=trust_remote_code
                )
            else:
                config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _load_error("student config", Source(str(path), None, True, path.name), exc) from exc
        model = _build_from_config(config, overrides, trust_remote_code)
        how = "config"
    else:
        if overrides:
            raise ConfigError(
                "--student-config only applies to a student built from a config, not to pretrained weights"
            )
        source = resolve_source(spec, "student")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        except DistillError:
            raise
        except Exception as exc:  # safetensors reports a damaged weight file as a plain Exception
            raise _load_error("student", source, exc) from exc
        how = "pretrained"
    model.to(device)
    return model, how


def document_attention(document_starts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The attention mask and positions that keep each packed document to itself.

    Args:
        document_starts: ``(B, T)`` bool, ``True`` where a document begins (position 0 of a
            row always starts a segment: a document continued from the previous row sees
            nothing of it).

    Returns:
        ``attention_mask``: ``(B, 1, T, T)`` bool, position ``t`` attends to ``s <= t`` of its
        own segment; ``position_ids``: ``(B, T)`` int64, counted from 0 in each segment (as if
        the document were alone).
    """
    starts = document_starts.clone()
    starts[:, 0] = True
    segment = starts.long().cumsum(dim=1)
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    index = torch.arange(length, device=segment.device).expand_as(segment)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return {"attention_mask": mask[:, None], "position_ids": index - first}


def sliding_window(config: Any) -> int | None:
    """The attention window of a model that restricts some layers to one (Gemma, Mistral...), else ``None``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


class LMHead:
    """The model's backbone and LM head, run separately so logits exist a chunk at a time.

    ``hidden_states(input_ids)`` -> ``(B, T, H)``; ``logits(hidden)`` applies the output
    embedding and the architecture's output transform (soft-capping, scaling) to
    ``(N, H)`` hidden states and returns ``(N, V)`` logits. :meth:`check_parity` compares
    the pair with the model's own forward once, so an architecture whose head does
    something else is refused instead of captured wrongly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backbone = _backbone(model)
        self.head = model.get_output_embeddings()
        if self.backbone is None or self.head is None:
            raise TeacherError(
                f"cannot separate the backbone and LM head of {type(model).__name__}; "
                "use a causal LM with get_decoder() and get_output_embeddings()"
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = _first_number(config, SOFTCAP_FIELDS)
        self.multiply = _first_number(config, MULTIPLY_FIELDS)
        self.divide = _first_number(config, DIVIDE_FIELDS)

    def hidden_states(self, input_ids: torch.Tensor, document_starts: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` int64 ids -> ``(B, T, H)`` final hidden states (after the last norm).

        ``document_starts`` ``(B, T)`` bool: attend within each document only (:func:`document_attention`).
        """
        extra = {} if document_starts is None else document_attention(document_starts)
        return self.backbone(input_ids=input_ids, use_cache=False, **extra).last_hidden_state

    def hidden_states_of(
        self, input_ids: torch.Tensor, layers: tuple[int, ...], document_starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The final ``(B, T, H)`` hidden states and those of ``layers`` (indices into ``output_hidden_states``,
        0 the embeddings); the last index is the final states themselves, after the final norm."""
        extra = {} if document_starts is None else document_attention(document_starts)
        out = self.backbone(input_ids=input_ids, use_cache=False, output_hidden_states=True, **extra)
        final, every = out.last_hidden_state, out.hidden_states
        last = len(every) - 1
        return final, {layer: final if layer == last else every[layer] for layer in layers}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` hidden states -> ``(..., V)`` logits, as the model's forward computes them."""
        logits = self.head(hidden.to(self.head.weight.device))
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def check_parity(self, input_ids: torch.Tensor) -> float:
        """Compare chunked logits with ``model(input_ids).logits`` on a short ``(1, n)`` sample.

        Returns the largest absolute difference; raises :class:`TeacherError` if it exceeds
        what the dtype's rounding explains.
        """
        reference = self.model(input_ids=input_ids, use_cache=False).logits.float()
        ours = self.logits(self.hidden_states(input_ids)).float()
        difference = (reference - ours.to(reference.device)).abs().max().item()
        scale = reference.abs().max().item() + 1.0
        tolerance = 1e-4 if self.head.weight.dtype == torch.float32 else 2e-2
        if not difference <= tolerance * scale:
            raise TeacherError(
                f"{type(self.model).__name__}: logits from the separated head differ from the model's "
                f"forward by {difference:.3g}; this architecture transforms its logits in a way the "
                "teacher pass does not reproduce"
            )
        return difference


def _backbone(model: nn.Module) -> nn.Module | None:
    """The module that maps ids to final hidden states: ``get_decoder()``, else the usual attribute names.

    Whatever is found, :meth:`LMHead.check_parity` confirms it against the model's forward.
    """
    candidates = [model.get_decoder() if hasattr(model, "get_decoder") else None]
    candidates += [getattr(model, name, None) for name in ("model", "transformer", "gpt_neox", "decoder")]
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    return None


def _first_number(config: Any, fields: tuple[str, ...]) -> float | None:
    for field in fields:
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1.0):
            return float(value)
    return None


def quiet_transformers() -> None:
    """Keep transformers' advisory warnings out of the progress output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
