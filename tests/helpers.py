"""Test helpers for forging caches: rewrite a shard's rows or its Arrow file, then reseal the manifest
so that the hashes match and only the reader's own checks stand between the forgery and the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline import codec, codec_v2
from pipeline.fingerprint import sha256_file
from pipeline.manifest import Manifest, render_manifest
from pipeline.rows import SparseRow
from pipeline.store.layout import MANIFEST_NAME, SCHEMA, schema_v2
from pipeline.store.reader import codec_settings, iter_shard_frames, read_manifest


def reseal_shard(cache: Path, index: int) -> None:
    """Record shard ``index``'s current size and sha256 in the manifest and reseal it."""
    path = cache / read_manifest(cache).shards[index].name
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["shards"][index].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    (cache / MANIFEST_NAME).write_bytes(render_manifest(manifest))


def write_table(path: Path, table: pa.Table, compression: str | None = None) -> None:
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=16)


@dataclass(frozen=True)
class Coder:
    """How one cache's rows are encoded: its schema, and row <-> frames for its format version."""

    manifest: Manifest

    @property
    def schema(self) -> pa.Schema:
        if self.manifest.format_version == 1:
            return SCHEMA
        return schema_v2(self.manifest.columns, codec_settings(self.manifest).label)

    def encode(self, row: SparseRow) -> dict[str, bytes]:
        if self.manifest.format_version == 1:
            return codec.encode_row(row)
        return codec_v2.encode_row(row, self.manifest.capture, codec_settings(self.manifest))

    def decode(self, frames: dict[str, bytes]) -> SparseRow:
        if self.manifest.format_version == 1:
            return codec.decode_row(frames, self.manifest.seq_len, self.manifest.k)
        settings = codec_settings(self.manifest)
        return codec_v2.decode_row(frames, self.manifest.seq_len, self.manifest.capture, settings, 2**32)


def rewrite_rows(cache: Path, index: int, change: Callable[..., dict[str, bytes]]) -> None:
    """Re-encode shard ``index`` with ``change(row_number, cells) -> cells`` applied to each row, and reseal.

    ``cells`` maps each column to its frame (or int); a ``change`` taking a third argument
    also gets the cache's :class:`Coder`.
    """
    manifest = read_manifest(cache)
    coder = Coder(manifest)
    entry = manifest.shards[index]
    rows = list(iter_shard_frames(cache, entry, manifest))
    columns: dict[str, list] = {name: [] for name in coder.schema.names}
    takes_coder = change.__code__.co_argcount >= 3
    for number, (seq_index, cells) in enumerate(rows):
        frames = {name: value for name, value in cells.items() if isinstance(value, bytes)}
        cells = {**cells, **coder.encode(coder.decode(frames))}  # the writer's own bytes
        changed = change(number, cells, coder) if takes_coder else change(number, cells)
        columns["seq_index"].append(seq_index)
        for name in coder.schema.names[1:]:
            columns[name].append(changed[name])
    write_table(cache / entry.name, pa.table(columns, schema=coder.schema))
    reseal_shard(cache, index)


def change_first_row(change: Callable[[SparseRow], SparseRow]):
    """A ``rewrite_rows`` change that edits the decoded first row and re-encodes it."""

    def apply(number: int, cells: dict, coder: Coder) -> dict:
        if number:
            return cells
        frames = {name: value for name, value in cells.items() if isinstance(value, bytes)}
        return {**cells, **coder.encode(change(coder.decode(frames)))}

    return apply


def child_peak_rss(code: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``code`` in a fresh Python; return its peak resident memory in bytes and its output.

    Peak RSS as the operating system counts it sees pyarrow's and zstd's allocations,
    which Python-level tracing misses.
    """
    report = "import resource as _r, sys as _s\n_s.stdout.write(f'\\nPEAK {_r.getrusage(_r.RUSAGE_SELF).ru_maxrss}\\n')"
    script = f"{code}\n{report}\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    assert peak, f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    kib = int(peak[-1].split()[1])
    return kib * (1024 if sys.platform != "darwin" else 1), result.stdout + result.stderr


# ----------------------------------------------------------------------------- fuzzing

WRONG_VALUES: list = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**62,
    -(2**62),
    0.5,
    -1e300,
    "",
    "x" * 300,
    "../../etc/passwd",
    "shard-00000.arrow",
    [],
    [None],
    [{}],
    {},
    {"name": 1},
]


def manifest_paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (objects by key, lists by index), containers included."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += manifest_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            paths += manifest_paths(item, (*prefix, index))
    return paths


def set_path(manifest: dict, path: tuple, value) -> dict:
    """A deep copy of ``manifest`` with ``value`` at ``path``."""
    mutated = json.loads(json.dumps(manifest))
    target = mutated
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return mutated


def read_everything(cache: Path) -> int:
    """What a user's commands do with a cache: open it, read every row, verify deeply, inspect it."""
    from pipeline.report import cache_report, verify_report

    rows = sum(1 for _ in pipeline_open(cache))
    verify_report(cache, deep=True)
    cache_report(cache)
    return rows


def pipeline_open(cache: Path):
    import pipeline

    return pipeline.open_cache(cache)


COLUMN_TYPES = [pa.int32(), pa.int64(), pa.string(), pa.large_binary(), pa.binary(4), pa.float64(), pa.list_(pa.int8())]


def _column_of(kind: pa.DataType, rows: int, rng) -> pa.Array:
    if pa.types.is_integer(kind):
        return pa.array([rng.randrange(-(2**31), 2**31) for _ in range(rows)], kind)
    if pa.types.is_floating(kind):
        return pa.array([rng.random() for _ in range(rows)], kind)
    if pa.types.is_list(kind):
        return pa.array([[1, 2]] * rows, kind)
    if pa.types.is_fixed_size_binary(kind):
        return pa.array([b"\0" * kind.byte_width] * rows, kind)
    if pa.types.is_string(kind):
        return pa.array(["x"] * rows, kind)
    return pa.array([b"\0"] * rows, kind)


def forged_frame(rng, original: bytes) -> bytes:
    """A frame that is wrong in one of the ways a reader must survive."""
    import zstandard

    choice = rng.randrange(6)
    if choice == 0:
        return b""
    if choice == 1:
        return original[: rng.randrange(max(1, len(original)))]
    if choice == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if choice == 3:  # a valid frame of another size
        return zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * rng.choice([0, 4, 1 << 20]))
    if choice == 4:
        return original + bytes(rng.randrange(1, 9))
    return zstandard.ZstdCompressor(write_content_size=True).compress(
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    )


def fuzz_case(cache: Path, rng) -> None:
    """Mutate ``cache`` in one random way (resealing hashes so only the reader's checks remain), then read it.

    Raises whatever the reader raises; the caller restores the cache afterwards.
    """
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    kind = rng.randrange(4)
    if kind == 0:  # a manifest field of the wrong type or value, resealed
        path = rng.choice(manifest_paths(manifest))
        value = rng.choice(
            [*WRONG_VALUES, rng.randrange(-(2**40), 2**40), "".join(rng.choice("ab0.-/") for _ in range(8))]
        )
        (cache / MANIFEST_NAME).write_bytes(render_manifest(set_path(manifest, path, value)))
    else:
        index = rng.randrange(len(manifest["shards"]))
        shard = cache / manifest["shards"][index]["name"]
        data = shard.read_bytes()
        if kind == 1:  # random bytes substituted
            mutable = bytearray(data)
            start = rng.randrange(len(mutable))
            mutable[start : start + rng.randrange(1, 9)] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            shard.write_bytes(bytes(mutable))
        else:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            schema = table.schema
            name = rng.choice(table.column_names)
            if kind == 2:  # a column of the wrong type
                column = _column_of(rng.choice(COLUMN_TYPES), table.num_rows, rng)
                fields = [pa.field(f.name, column.type if f.name == name else f.type) for f in schema]
                table = pa.table({**{n: table.column(n) for n in table.column_names}, name: column}, pa.schema(fields))
            else:  # a frame or a seq_index of the wrong size or value
                values = table.column(name).to_pylist()
                row = rng.randrange(len(values))
                if schema.field(name).type == pa.int64():  # seq_index, row provenance
                    values[row] = rng.choice([-1, values[row] + 1, 2**62, values[0]])
                else:
                    values[row] = forged_frame(rng, values[row])
                table = table.set_column(
                    table.column_names.index(name), schema.field(name), pa.array(values, schema.field(name).type)
                )
            write_table(shard, table.replace_schema_metadata(schema.metadata))
        reseal_shard(cache, index)
    read_everything(cache)


def fuzz_campaign(cache: Path, cases: int, seed: int) -> dict[str, int]:
    """Run ``cases`` random forgeries on ``cache`` (restored after each); count the outcomes by kind.

    Allowed outcomes are ``accepted`` and ``CacheError``; anything else is a defect.
    """
    import random
    import traceback

    from pipeline.errors import CacheError

    rng = random.Random(seed)
    originals = {path: path.read_bytes() for path in cache.iterdir() if path.is_file()}
    outcomes: dict[str, int] = {}
    for _ in range(cases):
        try:
            fuzz_case(cache, rng)
            outcome = "accepted"
        except CacheError:
            outcome = "CacheError"
        except Exception as exc:  # a defect: recorded with where it happened
            outcome = f"{type(exc).__name__}: {traceback.format_exc(limit=-1).strip().splitlines()[-3:]}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for path, payload in originals.items():
            path.write_bytes(payload)
    return outcomes


def tiny_student(vocab: int = 40):
    """A one-layer Llama of ``vocab`` logits, seeded: for loss and step tests that need a real LM head."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def make_dry_run(target: str, variables: dict[str, str], left_out: set[str]) -> tuple[list[list[str]], str]:
    """The ``distill`` commands ``make -n TARGET`` prints, each as ``[command, *args]``, and make's output.

    ``left_out`` names environment variables kept from make, so that a caller's settings (or
    a make running pytest) change nothing.
    """
    import os
    import shlex
    import subprocess

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(root), target] + [f"{k}={v}" for k, v in variables.items()],
        capture_output=True,
        text=True,
        env={key: value for key, value in os.environ.items() if key not in left_out},
    )
    assert result.returncode == 0, result.stderr
    commands = []
    for line in result.stdout.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if len(words) > 1 and words[0].endswith("/distill"):
            commands.append(words[1:])
    return commands, result.stdout
