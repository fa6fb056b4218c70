"""docs/FORMAT.md's code must keep working: its version 2 reader recipe decodes caches made by the real
teacher pass, for every capture strategy and codec mode, to exactly the rows the package decodes, in the
documented order; its generator reproduces the package's draws; its version 1 recipe reads the golden
version 1 cache; and both recipes refuse the forged caches the package refuses (hashes resealed to match,
so only the recipe's own checks stand in the way)."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import edit_manifest, make_cache, run_cli
from helpers import change_first_row, reseal_shard, rewrite_rows, write_table

import pipeline
from pipeline import codec_v2
from pipeline.capture import draw_uniforms
from pipeline.capture_spec import CaptureSpec
from pipeline.codec import encode_array
from pipeline.errors import CacheError
from pipeline.rows import SparseRow
from pipeline.store.reader import iter_shard_frames, read_manifest

ROOT = Path(__file__).resolve().parents[1]
FORMAT_DOC = ROOT / "docs" / "FORMAT.md"
V1_CACHE = ROOT / "tests" / "data" / "v1-cache"
GOLDEN_V2 = ROOT / "tests" / "data" / "golden-v2.json"
# What the version 2 recipe and the generator may import: nothing of the package.
ALLOWED_IMPORTS = {"hashlib", "json", "os", "numpy", "pyarrow", "zstandard"}

# 8 sequences of 16 tokens in 2 shards of 4 rows, 4 sequences per teacher batch.
COMMON = ("--seq-len", "16", "--max-tokens", "128", "--shard-tokens", "64", "--batch-size", "4")
BATCH_SIZE = 4
CAPTURES = {
    "topk": ("--capture", "topk", "--top-k", "6"),
    "topp": ("--capture", "topp", "--top-p", "0.6", "--min-k", "2", "--max-k", "8"),
    "sample": ("--capture", "sample", "--samples", "8", "--seed", "5"),
    "sample-logprobs": ("--capture", "sample", "--samples", "8", "--seed", "5", "--sample-logprobs"),
    "hybrid": ("--capture", "hybrid", "--top-k", "4", "--samples", "8", "--seed", "5"),
}
CASES = [f"{capture}/{mode}" for capture in CAPTURES for mode in codec_v2.MODES]
FORGED_CASE = "hybrid/quantized"  # lengths, counts, quantized logprobs: the most to forge


# ---------------------------------------------------------------------------- the doc's code


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", FORMAT_DOC.read_text(), re.S)


def block_defining(function: str) -> str:
    found = [block for block in python_blocks() if f"\ndef {function}(" in block]
    assert len(found) == 1, f"FORMAT.md should define {function} in exactly one python block"
    return found[0]


@pytest.fixture(scope="module")
def v2() -> dict:
    """The version 2 recipe, run on its own: it must be self-contained."""
    namespace: dict = {}
    exec(block_defining("read_cache_v2"), namespace)
    return namespace


@pytest.fixture(scope="module")
def v1(v2) -> dict:
    """The version 1 recipe, run after the version 2 block whose helpers it uses."""
    namespace = dict(v2)
    exec(block_defining("read_cache_v1"), namespace)
    return namespace


@pytest.fixture(scope="module")
def generator() -> dict:
    namespace: dict = {}
    exec(block_defining("uniform"), namespace)
    return namespace


@pytest.mark.parametrize("function", ["read_cache_v2", "uniform"])
def test_the_documented_code_imports_only_numpy_zstandard_pyarrow_and_the_standard_library(function):
    block = block_defining(function)
    imported = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    assert "pipeline" not in block


# ---------------------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def caches(teacher_dir: Path, corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``cache_for("strategy/mode")``: a cache made by the real teacher pass, once per module."""
    folder = tmp_path_factory.mktemp("format-doc")
    built: dict[str, Path] = {}

    def cache_for(case: str) -> Path:
        if case not in built:
            capture, mode = case.split("/")
            out = folder / case.replace("/", "-")
            built[case] = make_cache(
                teacher_dir, corpus["train"], out, *COMMON, *CAPTURES[capture], "--codec-mode", mode
            )
        return built[case]

    return cache_for


def assert_same_row(documented: dict, row: SparseRow) -> None:
    """The recipe's row equals the package's: same values, dtypes, padding and order."""
    np.testing.assert_array_equal(documented["input_ids"], row.input_ids)
    lengths = row.lengths if row.lengths is not None else np.full(row.ids.shape[0], row.width, dtype=np.int32)
    np.testing.assert_array_equal(documented["lengths"], lengths)
    for name in ("ids", "logprobs", "tail_logmass", "counts"):
        ours, theirs = documented[name], getattr(row, name)
        assert (ours is None) == (theirs is None), name
        if theirs is not None:
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            np.testing.assert_array_equal(ours, theirs, err_msg=name)


def assert_documented_order(row: dict, capture: dict) -> None:
    """FORMAT.md's promise: by probability (top-k, top-p, the hybrid head), ties and samples by ascending id."""
    head = capture["k"] if capture["strategy"] == "hybrid" else 0
    for t, length in enumerate(row["lengths"]):
        ids = row["ids"][t, :length]
        assert len(set(ids.tolist())) == length
        if capture["strategy"] == "sample":
            assert np.all(np.diff(ids) > 0)
            continue
        ranked = length if capture["strategy"] != "hybrid" else head
        values = row["logprobs"][t, :ranked]
        assert np.all(np.diff(values) <= 0)
        ties = np.diff(values) == 0
        assert np.all(np.diff(ids[:ranked])[ties] > 0)
        assert np.all(np.diff(ids[ranked:]) > 0)
    assert np.all(row["ids"][np.arange(row["ids"].shape[1])[None, :] >= row["lengths"][:, None]] == 0)


@pytest.mark.parametrize("case", CASES)
def test_the_v2_recipe_decodes_every_row_as_the_package_does_in_the_documented_order(v2, caches, case):
    cache = caches(case)
    capture = json.loads((cache / "manifest.json").read_text())["capture"]
    documented = list(v2["read_cache_v2"](str(cache)))
    packaged = list(pipeline.open_cache(cache))
    assert len(documented) == len(packaged) == 8
    for index, (ours, row) in enumerate(zip(documented, packaged, strict=True)):
        assert ours["seq_index"] == index
        assert_same_row(ours, row)
        assert_documented_order(ours, capture)


@pytest.mark.parametrize("case", ["topk/sqrt", "sample/quantized"])
def test_the_v2_recipe_reads_the_row_statistics_as_the_package_does(v2, caches, case):
    cache = caches(case)
    documented = v2["read_row_stats"](str(cache))
    assert documented.shape == (8, 2)
    assert np.array_equal(documented, pipeline.open_cache(cache).row_stats())


def test_the_v2_recipe_finds_no_row_statistics_in_a_cache_without_them(v2, caches, tmp_path):
    cache = shutil.copytree(caches("topk/sqrt"), tmp_path / "cache")
    edit_manifest(cache, lambda m: m["columns"][-1].update(name="later_stats", kind="statistics"))
    assert v2["read_row_stats"](str(cache)) is None


def test_provenance_columns_name_the_record_and_token_where_each_row_starts(v2, caches, corpus):
    from transformers import AutoTokenizer

    cache = caches("topk/lossless")
    manifest = read_manifest(cache)
    assert manifest.raw["dataset"]["files"] == [{"name": "train.jsonl", "first_record": 0}]
    packaged = [cells for entry in manifest.shards for _, cells in iter_shard_frames(cache, entry, manifest)]
    documented = list(v2["read_cache_v2"](str(cache)))
    tokenizer = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    records = [json.loads(line)["text"] for line in corpus["train"].read_text().splitlines()]
    for ours, cells in zip(documented, packaged, strict=True):
        record, offset = ours["source_record"], ours["record_offset"]
        assert (record, offset) == (cells["source_record"], cells["record_offset"])
        tokens = tokenizer(records[record])["input_ids"] + [tokenizer.eos_token_id]
        start = tokens[offset : offset + len(ours["input_ids"])]
        assert ours["input_ids"][: len(start)].tolist() == start


def test_the_v2_recipe_skips_an_unknown_optional_column_as_the_package_does(v2, caches, tmp_path):
    source = caches("topp/sqrt")
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    extra = {"name": "teacher_entropy", "kind": "statistics", "encoding": "f32-shuffle-zstd", "required": False}
    edit_manifest(cache, lambda m: m["columns"].append(extra))
    for index, entry in enumerate(read_manifest(cache).shards):
        path = cache / entry.name
        table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
        metadata = table.schema.metadata
        cells = pa.array([b"not decoded"] * table.num_rows, pa.binary())
        table = table.append_column(pa.field(extra["name"], pa.binary(), nullable=False), cells)
        write_table(path, table.replace_schema_metadata(metadata))
        reseal_shard(cache, index)
    documented = list(v2["read_cache_v2"](str(cache)))
    packaged = list(pipeline.open_cache(cache))
    original = list(pipeline.open_cache(source))
    assert len(documented) == len(packaged) == len(original) == 8
    for ours, row, before in zip(documented, packaged, original, strict=True):
        assert_same_row(ours, row)
        assert_same_row(ours, before)


# ---------------------------------------------------------------------------- the codec on its own


GOLDEN_CAPTURES = {
    "topk": {"strategy": "topk", "k": 4},
    "topp": {"strategy": "topp", "top_p": 0.9, "min_k": 1, "max_k": 8},
    "sample": {"strategy": "sample", "samples": 8, "sample_temperature": 1.0, "sample_logprobs": False, "seed": 5},
    "sample-logprobs": {
        "strategy": "sample",
        "samples": 8,
        "sample_temperature": 1.0,
        "sample_logprobs": True,
        "seed": 5,
    },
    "hybrid": {"strategy": "hybrid", "k": 2, "samples": 6, "sample_temperature": 1.0, "seed": 5},
}


def manifest_stub(capture: dict, codec: dict, seq_len: int, width: int) -> dict:
    """What ``decode_row_v2`` reads of a manifest."""
    full = {**capture, "logprob_temperature": 1.0, "log_base": "e"}
    return {"seq_len": seq_len, "logit_width": width, "capture": full, "codec": codec}


def as_golden_json(row: dict) -> dict:
    """A decoded row as tests/data/golden-v2.json records one (non-finite values as None)."""
    out = {"input_ids": row["input_ids"].tolist(), "ids": row["ids"].tolist()}
    for name in ("logprobs", "tail_logmass", "counts", "lengths"):
        value = row[name]
        if value is not None:
            out[name] = [[None if not np.isfinite(v) else v for v in r] for r in np.atleast_2d(value).tolist()]
    return out


def test_the_v2_recipe_decodes_the_golden_frames_to_the_recorded_rows(v2):
    golden = json.loads(GOLDEN_V2.read_text())
    assert len(golden["cases"]) == 13
    for label, case in golden["cases"].items():
        capture = GOLDEN_CAPTURES[label.split("/")[0]]
        manifest = manifest_stub(capture, case["codec"], golden["seq_len"], golden["vocab"])
        frames = {name: bytes.fromhex(frame) for name, frame in case["frames"].items()}
        decoded = as_golden_json(v2["decode_row_v2"](frames, manifest))
        if capture["strategy"] == "topk":
            del decoded["lengths"]
        assert decoded == case["decoded"], label


@pytest.mark.parametrize("mode", codec_v2.MODES)
def test_the_v2_recipe_reads_a_row_whose_dictionary_needs_32_bit_indices(v2, mode):
    """More than 65,536 distinct ids in one row: index gaps are stored as <u4."""
    rng = np.random.default_rng(7)
    seq_len, k, width = 1100, 64, 1_000_000
    ids = (rng.integers(0, width, size=(seq_len, 1)) + np.arange(k)[None, :] * 7919) % width
    logits = rng.normal(size=(seq_len, k + 1)) * 3
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    row = SparseRow(
        input_ids=rng.integers(0, width, size=seq_len),
        ids=ids,
        logprobs=logprobs[:, :k].astype(np.float32),
        tail_logmass=logprobs[:, k].astype(np.float32),
    )
    spec, settings = CaptureSpec("topk", k=k), codec_v2.CodecSettings.for_mode(mode)
    frames = codec_v2.encode_row(row, spec, settings)
    assert len(np.unique(ids)) > 2**16
    documented = v2["decode_row_v2"](frames, manifest_stub(spec.to_json(), settings.to_json(), seq_len, width))
    assert_same_row(documented, codec_v2.decode_row(frames, seq_len, spec, settings, width))


# ---------------------------------------------------------------------------- the generator


def test_the_documented_generator_gives_the_package_uniforms(generator):
    uniform = generator["uniform"]
    assert [uniform(1234, 5, j) for j in range(4)] == [
        0.4182315334816811,
        0.7012159424442961,
        0.8892987330968914,
        0.5659691166780549,
    ]
    assert [uniform(1234, 2**40 + 3, j) for j in range(2)] == [0.15775321504867246, 0.5347826333330007]
    positions = [0, 5, 2**40 + 3, 2**62 + 1]
    for seed in (0, 1234, 2**63 - 1):
        expected = draw_uniforms(seed, torch.tensor(positions), 6).tolist()
        assert [[uniform(seed, p, j) for j in range(6)] for p in positions] == expected


@pytest.mark.parametrize("case", ["sample/lossless", "hybrid/sqrt"])
def test_the_documented_generator_reproduces_the_cached_draws_from_the_teachers_logits(
    generator, caches, teacher_dir, case
):
    from transformers import AutoModelForCausalLM

    cache = caches(case)
    manifest = json.loads((cache / "manifest.json").read_text())
    capture, seq_len = manifest["capture"], manifest["seq_len"]
    assert capture["generator"] == "splitmix64-counter/1"
    head = capture["k"] if capture["strategy"] == "hybrid" else 0
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    rows = list(pipeline.open_cache(cache))
    for start in range(0, len(rows), BATCH_SIZE):  # the teacher pass's batches, so the logits are its own
        batch = rows[start : start + BATCH_SIZE]
        with torch.no_grad():
            logits = model(torch.from_numpy(np.stack([row.input_ids for row in batch]))).logits.double().numpy()
        for offset, row in enumerate(batch):
            for t in range(seq_len):
                position = (start + offset) * seq_len + t
                ids, counts = generator["position_draws"](logits[offset, t], capture, position, row.ids[t, :head])
                length = int(row.lengths[t])
                np.testing.assert_array_equal(ids, row.ids[t, head:length])
                np.testing.assert_array_equal(counts, row.counts[t, head:length])


# ---------------------------------------------------------------------------- refusals


def _rows(change):
    return lambda cache: rewrite_rows(cache, 0, change_first_row(change))


def _sample_a_head_id(row):
    ids = row.ids.copy()
    ids[0, 4] = ids[0, 0]  # hybrid head of 4: slot 4 is the first sampled id
    return dataclasses.replace(row, ids=ids)


def _one_draw_too_many(row):
    counts = row.counts.copy()
    counts[0, 4] += 1
    return dataclasses.replace(row, counts=counts)


def _shift_half_a_nat(row):
    return dataclasses.replace(row, logprobs=row.logprobs - 0.5)


def _nan_tail(row):
    tail = row.tail_logmass.copy()
    tail[2] = np.nan
    return dataclasses.replace(row, tail_logmass=tail)


def _lengths_below_the_head(cache):
    lengths = encode_array(np.full(16, 4), "<u4")
    rewrite_rows(cache, 0, lambda n, cells: {**cells, "lengths": lengths} if n == 1 else cells)


def _trailing_bytes(cache):
    rewrite_rows(cache, 0, lambda n, cells: {**cells, "input_ids": cells["input_ids"] + b"\0"} if n == 1 else cells)


def _arrow_compression(cache):
    path = cache / read_manifest(cache).shards[0].name
    write_table(path, pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all(), compression="zstd")
    reseal_shard(cache, 0)


def _flipped_byte(cache):
    path = cache / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncated_shard(cache):
    path = cache / "shard-00001.arrow"
    path.write_bytes(path.read_bytes()[:-100])


def _manifest(change):
    return lambda cache: edit_manifest(cache, change)


REQUIRED_COLUMN = {"name": "hidden_states", "kind": "hidden", "encoding": "f16-shuffle-zstd", "required": True}


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (_manifest(lambda m: m.update(format_version=3)), "format_version 3 is not supported"),
        (_flipped_byte, "shard-00001.arrow fails its checksum"),
        (_truncated_shard, "shard-00001.arrow has the wrong size"),
        (_manifest(lambda m: m["codec"].update(version=3)), "codec sparse-zstd/3 is not supported"),
        (_manifest(lambda m: m["codec"].update(mode="entropy-coded")), "codec mode 'entropy-coded'"),
        (_manifest(lambda m: m["codec"].update(dictionary="x")), "do not belong"),
        (_manifest(lambda m: m["capture"].update(strategy="beam")), "strategy 'beam' is not supported"),
        (_manifest(lambda m: m["columns"].append(REQUIRED_COLUMN)), "'hidden_states' .* is unknown"),
        (_manifest(lambda m: m["columns"][4].update(encoding="f16-shuffle-zstd")), "column 'logprobs' is"),
        (_manifest(lambda m: m["columns"].pop(3)), "columns lack 'counts'"),
        (_manifest(lambda m: m["dataset"].update(token_stream_sha256="0" * 64)), "token stream"),
        (_manifest(lambda m: m.update(note=float("inf"))), "not a finite number"),
        (_rows(_sample_a_head_id), "captured twice"),
        (_rows(_one_draw_too_many), "counts do not add up"),
        (_rows(_shift_half_a_nat), "do not add up to 1"),
        (_rows(_nan_tail), "NaN"),
        (_lengths_below_the_head, "number of ids is outside"),
        (_trailing_bytes, "exactly one frame"),
        (_arrow_compression, "body compression"),
    ],
)
def test_the_documented_recipe_refuses_forged_caches(v2, caches, tmp_path, forge, message):
    cache = tmp_path / "cache"
    shutil.copytree(caches(FORGED_CASE), cache)
    assert [column["name"] for column in json.loads((cache / "manifest.json").read_text())["columns"]][3:5] == [
        "counts",
        "logprobs",
    ]
    forge(cache)
    with pytest.raises(ValueError, match=message):
        for _ in v2["read_cache_v2"](str(cache)):
            pass
    with pytest.raises(CacheError):
        for _ in pipeline.open_cache(cache):
            pass


# ---------------------------------------------------------------------------- version 1


def test_the_v1_recipe_reads_the_golden_v1_cache_as_the_package_does(v1):
    documented = list(v1["read_cache_v1"](str(V1_CACHE)))
    packaged = list(pipeline.open_cache(V1_CACHE))
    assert len(documented) == len(packaged) == 6
    for index, (ours, row) in enumerate(zip(documented, packaged, strict=True)):
        assert ours["seq_index"] == index
        for name in ("input_ids", "ids", "logprobs", "tail_logmass"):
            assert ours[name].dtype == getattr(row, name).dtype, name
            np.testing.assert_array_equal(ours[name], getattr(row, name), err_msg=name)


def test_each_recipe_refuses_the_other_version(v1, caches):
    with pytest.raises(ValueError, match="format_version 1 is not supported"):
        list(v1["read_cache_v2"](str(V1_CACHE)))
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        list(v1["read_cache_v1"](str(caches("topk/lossless"))))


def _swap_first_two(row):
    ids, logprobs = row.topk_ids.copy(), row.topk_logprobs.copy()
    ids[0, [0, 1]], logprobs[0, [0, 1]] = ids[0, [1, 0]], logprobs[0, [1, 0]]
    return dataclasses.replace(row, ids=ids, logprobs=logprobs)


def _duplicate_id(row):
    ids = row.topk_ids.copy()
    ids[0, 1] = ids[0, 0]
    return dataclasses.replace(row, ids=ids)


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (_rows(_swap_first_two), "value invariants"),
        (_rows(_duplicate_id), "value invariants"),
        (_rows(_shift_half_a_nat), "value invariants"),
        (_rows(_nan_tail), "value invariants"),
        (_trailing_bytes, "exactly one frame"),
        (_arrow_compression, "body compression"),
        (_flipped_byte, "fails its checksum"),
        (_manifest(lambda m: m["codec"].update(version=2)), "not shuffle-zstd/1"),
        (_manifest(lambda m: m["dataset"].update(token_stream_sha256="0" * 64)), "token stream"),
        (_manifest(lambda m: m.update(note=float("inf"))), "not a finite number"),
    ],
)
def test_the_v1_recipe_refuses_forged_caches(v1, tmp_path, forge, message):
    cache = tmp_path / "cache"
    shutil.copytree(V1_CACHE, cache)
    forge(cache)
    with pytest.raises(ValueError, match=message):
        for _ in v1["read_cache_v1"](str(cache)):
            pass
    with pytest.raises(CacheError):
        for _ in pipeline.open_cache(cache):
            pass


def test_the_v2_recipe_reads_hidden_states_and_rebuilds_the_projection_as_the_package_does(
    v2, teacher_dir, corpus, tmp_path
):
    from pipeline import hidden
    from pipeline.store import reader

    assert np.array_equal(v2["hidden_projection"](11, 40, 7), hidden.projection(11, 40, 7))
    for encoding, dim in (("bf16", None), ("int8", "12")):
        cache = tmp_path / encoding
        options = ["--hidden-layers", "0,-1", "--hidden-encoding", encoding] + (["--hidden-dim", dim] if dim else [])
        result = run_cli(
            "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(cache),
            "--seq-len", "16", "--top-k", "4", "--max-tokens", "96", *options,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = reader.read_manifest(cache)
        for layer in manifest.hidden.layers:
            package = np.stack(
                [
                    reader.decode_hidden(cells, manifest)[layer]
                    for entry in manifest.shards
                    for _, cells in reader.iter_shard_frames(cache, entry, manifest, hidden=True)
                ]
            )
            assert np.array_equal(v2["read_hidden"](str(cache), layer), package)
        with pytest.raises(ValueError, match="no hidden states of layer 1"):
            v2["read_hidden"](str(cache), 1)
