"""``distill generate``: synthetic data written by the teacher, for sequence-level distillation.

Prompts come from any dataset the teacher pass reads: a text column (each document a
prompt, tokenized as the teacher's tokenizer does by default) or a chat column of
``{"role", "content"}`` messages (rendered with the tokenizer's chat template and a
generation prompt, tokenized without adding special tokens again, so no doubled BOS).

The loop (:func:`generate_batch`) is our own: a prefill over the left-padded batch, then one
token at a time through the model's KV cache, each draw keyed by (seed, prompt, return
sequence, step) (:mod:`pipeline.sampling`). A row stops at the teacher's EOS or at
``--max-new-tokens``.

Output folder::

    generation.json        the settings that decide the text, the parts written, and whether it is complete
    data/part-00000.jsonl  one row per (prompt, return sequence), ``--prompts-per-part`` prompts per part

Each part is written under a temporary name, fsynced and renamed, then listed (with its
sha256) in ``generation.json``. A killed run, started again with the same command, keeps
the listed parts that are intact and writes the rest: the same text on the same device
type, since a part's batches are the same and the draws are keyed. ``data/`` is a
dataset that ``distill teacher-cache --dataset OUT/data`` and ``datasets.load_dataset("json",
data_dir=OUT/data)`` read as is; its ``text`` column is prompt and response together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import models, paths
from pipeline.capture import capture
from pipeline.capture_spec import CaptureSpec
from pipeline.config import DEFAULT_SHARD_TOKENS
from pipeline.data import open_text_stream
from pipeline.errors import ConfigError, DatasetError, OutputExistsError
from pipeline.fingerprint import CURRENT_TOKENIZER_FINGERPRINT, sha256_file, tokenizer_fingerprint
from pipeline.generate_capture import CaptureSettings, CaptureSink, capture_header, sample_row
from pipeline.progress import progress as progress_bar
from pipeline.sampling import draw_keys, keyed_next_tokens
from pipeline.store import atomic, journal

log = logging.getLogger(__name__)

FORMAT_NAME = "distill-generated"
FORMAT_VERSION = 1
INFO_NAME = "generation.json"
DATA_DIR = "data"
MAX_SEED = 2**63
TOTALS = ("prompts", "rows", "new_tokens", "skipped_prompts")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``distill generate`` (validated on construction, each problem in one line)."""

    teacher: str
    dataset: str
    out: str
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    messages_column: str | None = None
    num_return_sequences: int = 1
    max_new_tokens: int = 128
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    seed: int = 0
    max_prompts: int | None = None
    batch_size: int = 8
    prompts_per_part: int = 64
    dtype: str | None = None
    device: str = "auto"
    capture_out: str | None = None
    capture_top_k: int = 64
    capture_seq_len: int | None = None
    capture_shard_tokens: int = DEFAULT_SHARD_TOKENS
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.capture_top_k >= 1, "--capture-top-k must be at least 1"),
            (self.capture_seq_len is None or self.capture_seq_len >= 2, "--capture-seq-len must be at least 2"),
            (self.capture_shard_tokens >= 1, "--capture-shard-tokens must be at least 1"),
            (self.num_return_sequences >= 1, "--num-return-sequences must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.gen_temperature > 0, "--gen-temperature must be > 0 (lower it towards 0 for near-greedy text)"),
            (0 < self.gen_top_p <= 1, "--gen-top-p must be in (0, 1]"),
            (0 <= self.seed < MAX_SEED, "--seed must be in [0, 2**63)"),
            (self.max_prompts is None or self.max_prompts >= 1, "--max-prompts must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.prompts_per_part >= 1, "--prompts-per-part must be at least 1"),
        ]
        for fine, message in checks:
            if not fine:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerateSummary:
    out: str
    prompts: int
    rows: int
    new_tokens: int
    seconds: float
    status: str = "written"
    skipped_prompts: int = 0


@dataclass(frozen=True)
class Prompt:
    """One prompt: its index in the dataset, as shown in the output, and its token ids."""

    index: int
    text: str
    ids: list[int]
    messages: list[dict[str, str]] | None = None


def prompt_ids(tokenizer: Any, document: str | list[dict[str, str]]) -> tuple[str, list[int]]:
    """A prompt's text and ids: a text document as the tokenizer encodes it by default; chat messages
    rendered by the chat template with a generation prompt, tokenized without special tokens added
    again (the template holds them)."""
    if isinstance(document, str):
        return document, list(tokenizer(document, add_special_tokens=True)["input_ids"])
    rendered = tokenizer.apply_chat_template(document, add_generation_prompt=True, tokenize=False)
    return rendered, list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@dataclass
class CapturedSteps:
    """The teacher's top-k distributions met while generating a batch, on the host.

    ``prefill``: ``(ids, logprobs, tail)`` of shapes ``(B, W, K)``, ``(B, W, K)``, ``(B, W)``
    over the left-padded prompt positions (``W`` the longest prompt); ``steps[s]``: the
    same of shapes ``(B, K)``, ``(B, K)``, ``(B,)`` for the logits that drew new token ``s + 1``.
    """

    prefill: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    captured = capture(logits.reshape(-1, logits.shape[-1]), CaptureSpec("topk", k=k), _no_positions(logits))
    shape = logits.shape[:-1]
    return (
        captured.ids.reshape(*shape, k).cpu(),
        captured.logprobs.reshape(*shape, k).cpu(),
        captured.tail_logmass.reshape(shape).cpu(),
    )


def _no_positions(logits: torch.Tensor) -> torch.Tensor:
    """Positions for :func:`~pipeline.capture.capture`: top-k draws nothing, so they key nothing."""
    return torch.zeros(logits.reshape(-1, logits.shape[-1]).shape[0], dtype=torch.int64, device=logits.device)


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    keys_of: tuple[torch.Tensor, torch.Tensor],
    cfg: GenerateConfig,
    pad_id: int,
    eos_ids: set[int],
    capture_k: int | None = None,
    captured: list[CapturedSteps] | None = None,
) -> list[tuple[list[int], str]]:
    """Generate a continuation of each prompt; each row's new ids and why it stopped (``eos`` or ``length``).

    Args:
        prompts: ``B`` lists of token ids (left-padded here with ``pad_id``).
        keys_of: ``(prompt_index, sample_index)``, each ``(B,)`` int64, keying the rows' draws.
        capture_k: also capture the teacher's top-``k`` distribution at every prompt position
            and every generated token (temperature 1, before the sampling's temperature),
            appended to ``captured`` as one :class:`CapturedSteps`.
    """
    device = model.get_input_embeddings().weight.device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if capture_k is not None and captured is not None:
        captured.append(CapturedSteps(_topk(out.logits, capture_k), steps))
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.int64)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    prompt_index, sample_index = (keys.to(device) for keys in keys_of)
    for step in range(cfg.max_new_tokens):
        keys = draw_keys(prompt_index, sample_index, cfg.num_return_sequences, step, cfg.max_new_tokens)
        logits = out.logits[:, -1, :].float()
        if capture_k is not None and step > 0:
            steps.append(_topk(logits, capture_k))
        token = keyed_next_tokens(logits, cfg.gen_temperature, cfg.gen_top_p, cfg.seed, keys)
        token = token.masked_fill(finished, pad_id)
        generated.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step + 1 == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    rows = torch.stack(generated, dim=-1).tolist()
    results = []
    for row in rows:
        ends = [at for at, token in enumerate(row) if token in eos_ids]
        results.append((row[: ends[0] + 1], "eos") if ends else (row, "length"))
    return results


def _response_text(tokenizer: Any, prompt: Prompt, new_ids: list[int]) -> str:
    """The continuation as text: decoded with the prompt and cut after it, so a leading space survives."""
    whole = tokenizer.decode(prompt.ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt.ids, skip_special_tokens=True)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new_ids, skip_special_tokens=True)


def run_generate(cfg: GenerateConfig, progress: bool = True) -> GenerateSummary:
    """Write (or finish) the synthetic dataset ``cfg`` describes; return what was written."""
    started = time.time()
    paths.reject_url(cfg.out, "--out")
    out = Path(cfg.out).expanduser()
    for source, flag in ((cfg.dataset, "--dataset"), (cfg.teacher, "--teacher")):
        if Path(source).expanduser().exists():
            paths.reject_overlap(cfg.out, "--out", source, flag)
    paths.check_out_folder(out)
    models.quiet_transformers()
    source = models.resolve_source(cfg.teacher, "teacher")
    tokenizer = models.load_tokenizer(source, "teacher", cfg.trust_remote_code)
    config = models.load_config(source, "teacher", cfg.trust_remote_code)
    chat = cfg.messages_column is not None
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"teacher '{source.display}' has no chat template, so --messages-column cannot be rendered; "
            "give a text column with --text-column, or a teacher whose tokenizer has a chat template"
        )
    eos_ids = _eos_ids(tokenizer, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    limit = models.max_positions(config)
    capture = None
    if cfg.capture_out is not None:
        capture = _capture_settings(cfg, limit)
        limit = capture.seq_len  # prompt and response must fit one cache row
    if limit is not None and cfg.max_new_tokens >= limit:
        raise ConfigError(
            f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the teacher's {limit} positions"
            + (" (--capture-seq-len)" if capture else "")
        )
    stream = open_text_stream(
        cfg.dataset, cfg.dataset_config, cfg.split, cfg.messages_column or cfg.text_column, messages=chat
    )
    device = models.pick_device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    header = _header(cfg, stream.display, source, config, tokenizer, dtype, device)
    cache_header = None
    if capture is not None:
        cache_header = capture_header(capture, cfg, stream.display, source, config, tokenizer, dtype, device, pad_id)
        header["capture_cache"] = {"top_k": capture.top_k, "seq_len": capture.seq_len}
    new_folders = paths.make_output_folder(out)
    sink = None
    try:
        with journal.CacheLock(out):
            done = _plan(out, header, cfg.overwrite)
            if done is None:
                info = json.loads((out / INFO_NAME).read_bytes())
                log.info("%s is already complete for these settings; nothing to do", out)
                totals = info["totals"]
                return GenerateSummary(
                    str(out), totals["prompts"], totals["rows"], totals["new_tokens"], 0.0, "already complete"
                )
            if capture is not None and cache_header is not None:
                rows_per_shard = max(1, capture.shard_tokens // capture.seq_len)
                sink = CaptureSink(Path(capture.out).expanduser(), cache_header, rows_per_shard, cfg.overwrite)
                done = _restart_with_cache(done, sink)
            model = models.load_teacher(source, dtype, device, cfg.trust_remote_code)
            parts = _write_parts(
                cfg, out, header, done, stream.documents, tokenizer, model, limit, pad_id, eos_ids, progress, sink
            )
            totals = {key: sum(part[key] for part in parts) for key in TOTALS}
            if not totals["rows"]:
                raise DatasetError(
                    f"dataset '{stream.display}' gave no prompt that fits the teacher's {limit} positions "
                    f"with --max-new-tokens {cfg.max_new_tokens}; lower it, or give shorter prompts"
                )
            if sink is not None:
                sink.finish(tokenizer)  # the cache's manifest before the data is marked complete
            _write_info(out, header, parts, complete=True, totals=totals)
    except BaseException:
        if sink is not None:
            sink.abort()
        for folder in reversed(new_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return GenerateSummary(
        str(out), totals["prompts"], totals["rows"], totals["new_tokens"], time.time() - started,
        skipped_prompts=totals["skipped_prompts"],
    )  # fmt: skip


def _capture_settings(cfg: GenerateConfig, limit: int | None) -> CaptureSettings:
    """``--capture-out``'s settings, checked: a local folder apart from every other path; rows of
    ``--capture-seq-len`` (default: the teacher's positions, at most 1024)."""
    assert cfg.capture_out is not None
    paths.reject_url(cfg.capture_out, "--capture-out")
    for other, flag in ((cfg.out, "--out"), (cfg.dataset, "--dataset"), (cfg.teacher, "--teacher")):
        if flag == "--out" or Path(other).expanduser().exists():
            paths.reject_overlap(cfg.capture_out, "--capture-out", other, flag)
    paths.check_out_folder(Path(cfg.capture_out).expanduser())
    seq_len = cfg.capture_seq_len or min(limit or 1024, 1024)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--capture-seq-len {seq_len} exceeds the teacher's {limit} positions; lower it")
    return CaptureSettings(cfg.capture_out, seq_len, cfg.capture_top_k, cfg.capture_shard_tokens)


def _restart_with_cache(done: list[dict[str, Any]], sink: CaptureSink) -> list[dict[str, Any]]:
    """The parts to keep so that generation restarts where the capture cache needs its next row.

    Parts after the one holding the cache's first missing row are written again (the same
    text, by the keyed draws); the rows the cache has already are skipped (:meth:`CaptureSink.add`).
    """
    before = 0
    for number, part in enumerate(done):
        if before + part["rows"] > sink.rows_written:
            sink.next_row = before
            return done[:number]
        before += part["rows"]
    sink.next_row = before
    return done


def _eos_ids(tokenizer: Any, source: models.Source) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if not ids:
        raise ConfigError(
            f"teacher '{source.display}''s tokenizer has no EOS token, so generation could not stop before "
            "--max-new-tokens; give a tokenizer with an eos_token"
        )
    return ids


def _header(
    cfg: GenerateConfig,
    display: str,
    source: models.Source,
    config: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """Everything that decides the generated text, and nothing that varies between identical runs."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher": {**models.teacher_identity(source, config), "dtype": str(dtype).removeprefix("torch.")},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, CURRENT_TOKENIZER_FINGERPRINT),
        "dataset": {"source": display, "config": cfg.dataset_config, "split": cfg.split},
        "prompt_column": cfg.messages_column or cfg.text_column,
        "chat": cfg.messages_column is not None,
        "generation": {
            "num_return_sequences": cfg.num_return_sequences,
            "max_new_tokens": cfg.max_new_tokens,
            "gen_temperature": cfg.gen_temperature,
            "gen_top_p": cfg.gen_top_p,
            "seed": cfg.seed,
            "max_prompts": cfg.max_prompts,
            "sampler": "inverse-cdf over the stable-sorted nucleus, splitmix64-counter/1 keyed by draw_keys",
        },
        "compute": {"device_type": device.type, "batch_size": cfg.batch_size, "prompts_per_part": cfg.prompts_per_part},
    }


def _plan(out: Path, header: dict[str, Any], overwrite: bool) -> list[dict[str, Any]] | None:
    """The parts to keep (``None``: the output is complete already); tidies ``out`` for the run."""
    info_path, data = out / INFO_NAME, out / DATA_DIR
    others = sorted(p.name for p in out.iterdir() if p.name not in (INFO_NAME, DATA_DIR, journal.LOCK_NAME))
    if others or (not info_path.exists() and data.exists()):
        raise OutputExistsError(
            f"--out '{out}' holds files that generate did not write ({', '.join(others[:3]) or DATA_DIR}); "
            "choose an empty or new folder"
        )
    if overwrite or not info_path.exists():
        if data.exists():
            for path in data.iterdir():
                path.unlink()
            data.rmdir()
        info_path.unlink(missing_ok=True)
        _write_info(out, header, [], complete=False)
        return []
    try:
        info = json.loads(info_path.read_bytes())
        recorded, parts, complete = info["header"], list(info["parts"]), bool(info["complete"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise OutputExistsError(f"--out '{out}': {INFO_NAME} is unreadable; pass --overwrite to start afresh") from None
    if recorded != header:
        raise OutputExistsError(
            f"--out '{out}' holds generated data of other settings; "
            "pass --overwrite to replace it, or choose another folder"
        )
    if complete:
        return None
    kept = []
    for part in parts:
        path = data / part["name"]
        if not path.is_file() or path.is_symlink() or sha256_file(path) != part["sha256"]:
            break
        kept.append(part)
    names = {part["name"] for part in kept}
    for path in data.iterdir() if data.exists() else []:
        if path.name not in names:
            path.unlink()
    if kept:
        log.info("resuming after %d written part(s)", len(kept))
    return kept


def _write_info(
    out: Path, header: dict[str, Any], parts: list[dict[str, Any]], complete: bool, totals: dict[str, int] | None = None
) -> None:
    info = {"header": header, "parts": parts, "complete": complete, **({"totals": totals} if totals else {})}
    atomic.write_bytes_atomic(
        out / INFO_NAME, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode(), crash_name="generation-info"
    )


def _write_parts(
    cfg: GenerateConfig,
    out: Path,
    header: dict[str, Any],
    done: list[dict[str, Any]],
    documents: Any,
    tokenizer: Any,
    model: torch.nn.Module,
    limit: int | None,
    pad_id: int,
    eos_ids: set[int],
    progress: bool,
    sink: CaptureSink | None = None,
) -> list[dict[str, Any]]:
    """One part at a time: its prompts' rows in batches of ``--batch-size``, written, then listed in the info.

    With a ``sink`` (``--capture-out``) each row also goes to the capture cache, in order.
    """
    data = out / DATA_DIR
    data.mkdir(exist_ok=True)
    parts = list(done)
    room = None if limit is None else limit - cfg.max_new_tokens
    remaining = iter(documents)
    for _ in itertools.islice(remaining, len(done) * cfg.prompts_per_part):
        pass  # prompts of the parts already written: read past, not tokenized
    bar = progress_bar(None, "generate", "rows", 0, enabled=progress)
    number = len(done)
    while cfg.max_prompts is None or number * cfg.prompts_per_part < cfg.max_prompts:
        first = number * cfg.prompts_per_part
        take = cfg.prompts_per_part if cfg.max_prompts is None else min(cfg.prompts_per_part, cfg.max_prompts - first)
        documents_of_part = list(itertools.islice(remaining, take))
        if not documents_of_part:
            break
        chunk = [
            Prompt(first + offset, *prompt_ids(tokenizer, document), None if isinstance(document, str) else document)
            for offset, document in enumerate(documents_of_part)
            if (document.strip() if isinstance(document, str) else document)
        ]
        fitting = [prompt for prompt in chunk if room is None or len(prompt.ids) <= room]
        rows = [(prompt, sample) for prompt in fitting for sample in range(cfg.num_return_sequences)]
        lines, new_tokens = [], 0
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            keys = (torch.tensor([p.index for p, _ in batch]), torch.tensor([s for _, s in batch]))
            captured: list[CapturedSteps] = []
            capture_k = None if sink is None else sink.spec.k
            results = generate_batch(model, [p.ids for p, _ in batch], keys, cfg, pad_id, eos_ids, capture_k, captured)
            width = max(len(p.ids) for p, _ in batch)
            for number_in_batch, ((prompt, sample), (new_ids, reason)) in enumerate(zip(batch, results, strict=True)):
                lines.append(json.dumps(_row(cfg, tokenizer, prompt, sample, new_ids, reason), ensure_ascii=False))
                new_tokens += len(new_ids)
                if sink is not None:
                    row = sample_row(prompt.ids, new_ids, captured[0], number_in_batch, width, sink.seq_len, pad_id)
                    sink.add(row, prompt.index, sample)
            bar.update(len(batch))
        name = f"part-{number:05d}.jsonl"
        atomic.write_bytes_atomic(data / name, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
        parts.append(
            {"name": name, "prompts": len(fitting), "rows": len(lines), "new_tokens": new_tokens,
             "skipped_prompts": len(chunk) - len(fitting), "sha256": sha256_file(data / name)}
        )  # fmt: skip
        _write_info(out, header, parts, complete=False)
        atomic.crash_point("generate-part")
        number += 1
    bar.close()
    return parts


def _row(
    cfg: GenerateConfig, tokenizer: Any, prompt: Prompt, sample: int, new_ids: list[int], reason: str
) -> dict[str, Any]:
    response = _response_text(tokenizer, prompt, new_ids)
    row: dict[str, Any] = {
        "prompt_index": prompt.index,
        "sample_index": sample,
        "prompt": prompt.text,
        "response": response,
        "text": prompt.text + response,
        "finish_reason": reason,
        "response_tokens": len(new_ids),
        "gen_temperature": cfg.gen_temperature,
        "gen_top_p": cfg.gen_top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
    }
    if prompt.messages is not None:
        row["messages"] = [*prompt.messages, {"role": "assistant", "content": response}]
    return row
