"""Codec version 2: round trips per strategy and mode, the stated error bounds, and golden bytes."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from pipeline import codec_v2
from pipeline.capture import capture
from pipeline.capture_spec import CaptureSpec
from pipeline.codec_v2 import CodecSettings, decode_row, encode_row
from pipeline.errors import CacheError
from pipeline.rows import SparseRow

GOLDEN = Path(__file__).parent / "data" / "golden-v2.json"
VOCAB = 50
SEQ_LEN = 6
SPECS = {
    "topk": CaptureSpec(strategy="topk", k=4),
    "topp": CaptureSpec(strategy="topp", k=None, top_p=0.9, min_k=1, max_k=8),
    "sample": CaptureSpec(strategy="sample", k=None, samples=8, sample_temperature=1.0, sample_logprobs=False, seed=5),
    "sample-logprobs": CaptureSpec(
        strategy="sample", k=None, samples=8, sample_temperature=1.0, sample_logprobs=True, seed=5
    ),
    "hybrid": CaptureSpec(strategy="hybrid", k=2, samples=6, sample_temperature=1.0, seed=5),
}
SETTINGS = {mode: CodecSettings.for_mode(mode) for mode in codec_v2.MODES}


def captured_row(spec: CaptureSpec, seed: int = 0, seq_len: int = SEQ_LEN, vocab: int = VOCAB) -> SparseRow:
    """A row captured by the real capture code from seeded random logits: ``(seq_len, K)``."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(seq_len, vocab, generator=generator) * 3
    captured = capture(logits, spec, torch.arange(seq_len, dtype=torch.int64))
    fields = {name: getattr(captured, name) for name in ("ids", "logprobs", "tail_logmass", "counts", "lengths")}
    arrays = {name: value.numpy() if value is not None else None for name, value in fields.items()}
    input_ids = torch.randint(0, vocab, (seq_len,), generator=generator).numpy()
    return SparseRow(input_ids=input_ids, **arrays)


def valid_values(row: SparseRow) -> list[dict[int, float]]:
    """Per position: id -> log-probability over the valid slots (order-free)."""
    valid = row.valid()
    return [
        {int(i): float(v) for i, v, ok in zip(ids, values, keep, strict=True) if ok}
        for ids, values, keep in zip(row.ids, row.logprobs, valid, strict=True)
    ]


def captured_probability_mass(row: SparseRow) -> np.ndarray:
    return np.where(row.valid(), np.exp(row.logprobs.astype(np.float64)), 0).sum(axis=1)


@pytest.mark.parametrize("mode", codec_v2.MODES)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_keeps_ids_counts_and_tail_and_values_within_the_modes_bound(name, mode):
    spec, settings = SPECS[name], SETTINGS[mode]
    for seed in range(5):
        row = captured_row(spec, seed)
        decoded = decode_row(encode_row(row, spec, settings), SEQ_LEN, spec, settings, VOCAB)
        np.testing.assert_array_equal(decoded.input_ids, row.input_ids)
        original_sets = [sorted(ids[keep]) for ids, keep in zip(row.ids, row.valid(), strict=True)]
        decoded_sets = [sorted(ids[keep]) for ids, keep in zip(decoded.ids, decoded.valid(), strict=True)]
        assert original_sets == decoded_sets
        if spec.has_counts:
            by_id = [
                dict(zip(i[k], c[k], strict=True)) for i, c, k in zip(row.ids, row.counts, row.valid(), strict=True)
            ]
            got = [
                dict(zip(i[k], c[k], strict=True))
                for i, c, k in zip(decoded.ids, decoded.counts, decoded.valid(), strict=True)
            ]
            assert by_id == got
        if not spec.has_logprobs:
            assert decoded.logprobs is None
            continue
        np.testing.assert_array_equal(decoded.tail_logmass, row.tail_logmass)
        for before, after in zip(valid_values(row), valid_values(decoded), strict=True):
            for token, value in before.items():
                if mode == "lossless":
                    assert after[token] == pytest.approx(value, rel=2**-11, abs=1e-6)
                elif mode == "quantized":
                    assert abs(after[token] - value) <= settings.logprob_step / 2 + 1e-5
                else:
                    root, step = math.exp(value / 2), settings.sqrt_step
                    bound = step / 2 if root >= step / 2 else step / 4
                    assert abs(math.exp(after[token] / 2) - root) <= bound + 1e-6


@pytest.mark.parametrize("mode", ["quantized", "sqrt"])
def test_reconstruction_kl_of_a_peaked_top_k_row_stays_within_the_stated_estimate(mode):
    """quantized: about step^2 / 24 nats per position; sqrt: about K step^2 / 6 at most."""
    spec, settings = CaptureSpec(strategy="topk", k=32), SETTINGS[mode]
    row = captured_row(spec, seed=3, seq_len=64, vocab=400)
    decoded = decode_row(encode_row(row, spec, settings), 64, spec, settings, 400)
    kl = []
    for before, after, tail in zip(valid_values(row), valid_values(decoded), row.tail_logmass, strict=True):
        p = np.array([math.exp(before[t]) for t in sorted(before)] + [math.exp(tail)])
        q = np.array([math.exp(after[t]) for t in sorted(before)] + [math.exp(tail)])
        p, q = p / p.sum(), q / q.sum()
        kl.append(float(np.sum(p * np.log(p / q))))
    estimate = settings.logprob_step**2 / 24 if mode == "quantized" else 32 * settings.sqrt_step**2 / 6
    assert 0 < np.mean(kl) <= 2 * estimate


def test_sqrt_levels_reconstruct_inside_their_interval_and_zero_stays_finite():
    step = 1 / 16
    logprobs = np.log(np.array([1.0, 0.5, 0.01, (step / 2) ** 2 * 0.99, 1e-30]))
    levels = codec_v2.sqrt_levels(logprobs, step)
    np.testing.assert_array_equal(levels, [16, 11, 2, 0, 0])
    back = codec_v2.sqrt_logprobs(levels, step)
    assert np.isfinite(back).all() and back[0] == 0.0
    assert back[3] == pytest.approx(2 * math.log(step / 4))


def test_sqrt_level_above_one_is_refused():
    spec, settings = SPECS["topk"], SETTINGS["sqrt"]
    frames = encode_row(captured_row(spec), spec, settings)
    top = round(1 / settings.sqrt_step)
    levels = np.full(SEQ_LEN * 4, top + 1)
    frames["logprobs"] = codec_v2._frame(levels, "<u2", 3)
    with pytest.raises(CacheError, match="level is above 1"):
        decode_row(frames, SEQ_LEN, spec, settings, VOCAB)


@pytest.mark.parametrize("mode", codec_v2.MODES)
def test_mass_tolerance_covers_every_honest_row(mode):
    """The decoder's mass check must never refuse what the encoder wrote from a real capture."""
    spec, settings = CaptureSpec(strategy="topk", k=64), SETTINGS[mode]
    for seed in range(3):
        row = captured_row(spec, seed, seq_len=32, vocab=1000)
        decode_row(encode_row(row, spec, settings), 32, spec, settings, 1000)
    assert codec_v2.mass_tolerance(spec, settings) < 0.7


# ---------------------------------------------------------------------------- golden bytes


def golden_cases() -> dict[str, tuple[CaptureSpec, CodecSettings]]:
    cases = {}
    for name, spec in SPECS.items():
        modes = codec_v2.MODES if spec.has_logprobs else ("lossless",)
        for mode in modes:
            cases[f"{name}/{mode}"] = (spec, SETTINGS[mode])
    return cases


def decoded_json(row: SparseRow) -> dict[str, list]:
    """A decoded row as JSON-able lists (float32 values kept exactly as floats)."""
    out = {"input_ids": row.input_ids.tolist(), "ids": row.ids.tolist()}
    for name in ("logprobs", "tail_logmass", "counts", "lengths"):
        value = getattr(row, name)
        if value is not None:
            out[name] = [[None if not math.isfinite(v) else v for v in r] for r in np.atleast_2d(value).tolist()]
    return out


def write_golden() -> None:  # pragma: no cover - run by hand when the format version changes
    golden = {"zstd_version": zstandard.ZSTD_VERSION, "seq_len": SEQ_LEN, "vocab": VOCAB, "cases": {}}
    for label, (spec, settings) in golden_cases().items():
        frames = encode_row(captured_row(spec), spec, settings)
        decoded = decode_row(frames, SEQ_LEN, spec, settings, VOCAB)
        golden["cases"][label] = {
            "codec": settings.to_json(),
            "frames": {name: frame.hex() for name, frame in frames.items()},
            "decoded": decoded_json(decoded),
        }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


@pytest.mark.parametrize("label", sorted(golden_cases()))
def test_golden_bytes_decode_to_the_recorded_rows(label):
    """Stored bytes must keep decoding to the same values, whatever zstd writes today."""
    golden = json.loads(GOLDEN.read_text())
    case = golden["cases"][label]
    spec = golden_cases()[label][0]
    settings = CodecSettings.from_json(case["codec"])
    frames = {name: bytes.fromhex(frame) for name, frame in case["frames"].items()}
    decoded = decode_row(frames, golden["seq_len"], spec, settings, golden["vocab"])
    assert decoded_json(decoded) == case["decoded"]


def row_from_json(decoded: dict[str, list]) -> SparseRow:
    """The inverse of :func:`decoded_json` (``None`` back to ``-inf``)."""

    def floats(name: str, squeeze: bool = False) -> np.ndarray | None:
        if name not in decoded:
            return None
        values = np.array([[-np.inf if v is None else v for v in r] for r in decoded[name]], dtype=np.float32)
        return values[0] if squeeze else values

    counts, lengths = decoded.get("counts"), decoded.get("lengths")
    return SparseRow(
        input_ids=np.array(decoded["input_ids"], dtype=np.int64),
        ids=np.array(decoded["ids"], dtype=np.int64),
        logprobs=floats("logprobs"),
        tail_logmass=floats("tail_logmass", squeeze=True),
        counts=None if counts is None else np.array(counts, dtype=np.int32),
        lengths=None if lengths is None else np.array(lengths, dtype=np.int32)[0],
    )


@pytest.mark.parametrize("label", sorted(golden_cases()))
def test_encoder_still_writes_the_golden_bytes(label):
    """The recorded rows (exact values, no float computation in between) encode to the recorded bytes."""
    golden = json.loads(GOLDEN.read_text())
    if tuple(golden["zstd_version"]) != tuple(zstandard.ZSTD_VERSION):
        pytest.skip(f"libzstd {zstandard.ZSTD_VERSION} differs from the golden bytes' {golden['zstd_version']}")
    spec, settings = golden_cases()[label]
    frames = encode_row(row_from_json(golden["cases"][label]["decoded"]), spec, settings)
    assert {name: frame.hex() for name, frame in frames.items()} == golden["cases"][label]["frames"]


if __name__ == "__main__":  # pragma: no cover
    write_golden()


@pytest.mark.parametrize("mode", codec_v2.MODES)
def test_ids_the_teacher_gives_no_probability_are_stored_at_the_floor_and_read_back(mode):
    """A teacher that masks logits to -inf can put ids of probability 0 among its top-k."""
    spec, settings = CaptureSpec(strategy="topk", k=8), SETTINGS[mode]
    logits = torch.full((SEQ_LEN, 10), float("-inf"))
    logits[:, :5] = torch.randn(SEQ_LEN, 5, generator=torch.Generator().manual_seed(0))
    captured = capture(logits, spec, torch.arange(SEQ_LEN))
    assert torch.isinf(captured.logprobs).any()
    row = SparseRow(
        input_ids=np.zeros(SEQ_LEN, dtype=np.int64),
        ids=captured.ids.numpy(),
        logprobs=captured.logprobs.numpy(),
        tail_logmass=captured.tail_logmass.numpy(),
    )
    decoded = decode_row(encode_row(row, spec, settings), SEQ_LEN, spec, settings, 10)
    assert np.isfinite(decoded.logprobs).all()
    np.testing.assert_allclose(np.exp(decoded.logprobs[:, 5:]), 0.0, atol=(settings.step or 0) ** 2)
