"""Hidden states in the cache: encodings within their stated bounds, the projection a reader rebuilds
with numpy alone, the layer indexing, and what the teacher pass stores against the teacher's own states."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import run_cli

from pipeline import hidden
from pipeline.errors import ConfigError
from pipeline.store.reader import read_manifest

OPTIONS = ("--seq-len", "16", "--top-k", "4", "--max-tokens", "160", "--batch-size", "3")


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_encodings_round_trip_within_their_stated_bound(encoding):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((12, 40)) * rng.uniform(0.01, 30, (12, 1))).astype(np.float32)
    values[3] = 0.0  # a position of zeros: int8's scale is 0 there
    decoded = hidden.decode(hidden.encode(values, encoding, 3), encoding, 12, 40)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    assert np.all(np.abs(decoded - values) <= hidden.error_bound(values, encoding))
    assert np.all(decoded[3] == 0)
    with pytest.raises(Exception, match="frame"):
        hidden.decode(hidden.encode(values, encoding, 3), encoding, 12, 41)  # a frame of another size


def numpy_only_projection(seed: int, width: int, dim: int) -> np.ndarray:
    """The projection rebuilt from the words of docs/FORMAT.md, with Python integers and numpy alone."""
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    base = splitmix64(seed)
    signs = [1.0 if splitmix64((base + n) & mask) & 1 == 0 else -1.0 for n in range(width * dim)]
    return (np.array(signs, dtype=np.float32) / np.float32(np.sqrt(dim))).reshape(width, dim)


def test_the_projection_is_rebuilt_from_its_seed_alone():
    matrix = hidden.projection(7, 24, 5)
    assert np.array_equal(matrix, numpy_only_projection(7, 24, 5))
    assert set(np.unique(np.abs(matrix) * np.sqrt(5)).round(6)) == {1.0}
    assert not np.array_equal(matrix, hidden.projection(8, 24, 5))
    # Norms are kept in expectation (Johnson-Lindenstrauss): a wide projection keeps them closely.
    vectors = np.random.default_rng(1).standard_normal((50, 512)).astype(np.float32)
    ratio = np.linalg.norm(vectors @ hidden.projection(3, 512, 256), axis=1) / np.linalg.norm(vectors, axis=1)
    assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_layers_resolve_from_the_end_and_bad_ones_are_refused():
    assert hidden.resolve_layers((8, 16, -1), 18) == (8, 16, 18)
    assert hidden.resolve_layers((-19, 3), 18) == (0, 3)  # -19 is the embeddings
    with pytest.raises(ConfigError, match="names a layer twice"):
        hidden.resolve_layers((0, -19), 18)
    with pytest.raises(ConfigError, match="outside the teacher's hidden states 0"):
        hidden.resolve_layers((19,), 18)


def stored_states(cache) -> tuple[list[np.ndarray], dict[int, list[np.ndarray]]]:
    """Each row's input ids and stored hidden states, read with pyarrow, numpy and the documented decoders."""
    manifest = read_manifest(cache)
    spec = manifest.hidden
    ids, states = [], {layer: [] for layer in spec.layers}
    for entry in manifest.shards:
        table = pa.ipc.open_file(str(cache / entry.name)).read_all()
        for cell in table.column("input_ids").to_pylist():
            from pipeline.codec import decode_array

            ids.append(decode_array(cell, "<u4", manifest.seq_len).astype(np.int64))
        for layer in spec.layers:
            for cell in table.column(hidden.column_name(layer)).to_pylist():
                states[layer].append(hidden.decode(cell, spec.encoding, manifest.seq_len, spec.dim))
    return ids, states


def teacher_states(teacher_dir, ids: list[np.ndarray]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.model(input_ids=torch.from_numpy(np.stack(ids)), output_hidden_states=True)
    return out.hidden_states, out.last_hidden_state


def test_stored_bf16_states_equal_the_teachers_within_the_bound(teacher_dir, corpus, tmp_path):
    cache = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(cache),
        *OPTIONS, "--hidden-layers", "0,1,-1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(cache)
    assert manifest.hidden.layers == (0, 1, 2) and manifest.raw["hidden"]["projection"] is None
    ids, states = stored_states(cache)
    every, final = teacher_states(teacher_dir, ids)
    for layer in (0, 1, 2):
        expected = (final if layer == 2 else every[layer]).numpy()
        stored = np.stack(states[layer])
        assert np.all(np.abs(stored - expected) <= hidden.error_bound(expected, "bf16") + 1e-5)
    # Readers that do not know the columns still read the cache: verify and a student pass.
    assert run_cli("verify", str(cache)).exit_code == 0
    inspect = run_cli("inspect", str(cache), "--json")
    assert inspect.exit_code == 0


def test_stored_int8_projected_states_equal_the_projected_teacher_states(teacher_dir, corpus, tmp_path):
    cache = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(cache),
        *OPTIONS, "--hidden-layers", "1", "--hidden-encoding", "int8", "--hidden-dim", "16", "--hidden-seed", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = read_manifest(cache).hidden
    assert (spec.dim, spec.width, spec.encoding, spec.seed) == (16, 64, "int8", 5)
    ids, states = stored_states(cache)
    every, _ = teacher_states(teacher_dir, ids)
    expected = every[1].numpy() @ numpy_only_projection(5, 64, 16)
    stored = np.stack(states[1])
    assert np.all(np.abs(stored - expected) <= hidden.error_bound(expected, "int8") + 1e-4)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--hidden-layers", "3"), "--hidden-layers 3 is outside the teacher's hidden states 0 (embeddings) .. 2"),
        (("--hidden-layers", "1", "--hidden-dim", "65"), "--hidden-dim 65 is wider than the teacher's hidden size 64"),
        (("--hidden-dim", "8"), "apply to --hidden-layers"),
        (("--hidden-layers", "1,x"), "is not a comma-separated list of layer numbers"),
    ],
)
def test_bad_hidden_options_are_refused_before_anything_is_written(teacher_dir, corpus, tmp_path, options, fragment):
    out = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(out),
        *OPTIONS, *options,
    )  # fmt: skip
    assert result.exit_code != 0 and fragment in result.output
    assert not out.exists()


def test_a_recode_carries_the_hidden_states_as_stored(teacher_dir, corpus, tmp_path):
    cache, recoded = tmp_path / "cache", tmp_path / "recoded"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(cache),
        *OPTIONS, "--hidden-layers", "2", "--hidden-encoding", "int8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("recode", "--cache", str(cache), "--out", str(recoded), "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert read_manifest(recoded).hidden == read_manifest(cache).hidden
    assert np.array_equal(np.stack(stored_states(recoded)[1][2]), np.stack(stored_states(cache)[1][2]))
