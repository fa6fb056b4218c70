import numpy as np
import pytest
import zstandard

from pipeline import codec
from pipeline.errors import CacheError


def random_row(seq_len: int = 12, k: int = 5, vocab: int = 262144, seed: int = 0) -> codec.SparseRow:
    rng = np.random.default_rng(seed)
    logprobs = -np.sort(rng.exponential(2.0, size=(seq_len, k)), axis=1).astype(np.float32)
    tail = np.log(rng.uniform(1e-9, 0.5, size=seq_len)).astype(np.float32)
    tail[0] = -np.inf
    return codec.SparseRow(
        input_ids=rng.integers(0, vocab, size=seq_len),
        ids=rng.integers(0, vocab, size=(seq_len, k)),
        logprobs=logprobs,
        tail_logmass=tail,
    )


def test_shuffle_is_inverted_exactly():
    values = np.arange(1000, dtype="<u4") * 2654435761 % 262144
    raw = codec.shuffle_bytes(values.astype("<u4"))
    assert raw != values.astype("<u4").tobytes()
    np.testing.assert_array_equal(codec.unshuffle_bytes(raw, "<u4", values.size), values)


def test_row_round_trip_keeps_ids_and_tail_exact_and_logprobs_within_fp16():
    row = random_row()
    decoded = codec.decode_row(codec.encode_row(row), seq_len=12, k=5)
    np.testing.assert_array_equal(decoded.input_ids, row.input_ids)
    np.testing.assert_array_equal(decoded.topk_ids, row.topk_ids)
    np.testing.assert_array_equal(decoded.tail_logmass, row.tail_logmass)
    assert decoded.topk_ids.dtype == np.int64 and decoded.topk_logprobs.dtype == np.float32
    np.testing.assert_allclose(decoded.topk_logprobs, row.topk_logprobs, rtol=2**-11, atol=1e-7)


def test_golden_frame_decodes_to_known_values():
    # A frame written by codec version 1 and pinned here: readers must keep decoding it.
    frame = bytes.fromhex("28b52ffd200c610000020105000000000000000000")
    np.testing.assert_array_equal(codec.decode_array(frame, "<u4", 3), [2, 1, 5])


def test_golden_frame_matches_what_the_encoder_writes():
    assert codec.encode_array(np.array([2, 1, 5]), "<u4") == bytes.fromhex("28b52ffd200c610000020105000000000000000000")


def test_frame_declaring_another_size_is_refused_before_decompressing():
    frame = codec.encode_array(np.arange(10), "<u4")
    with pytest.raises(CacheError, match="declares 40 bytes where 400"):
        codec.decode_array(frame, "<u4", 100)


def test_frame_without_declared_size_is_refused():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 40)
    with pytest.raises(CacheError, match="declares"):
        codec.decode_array(frame, "<u4", 10)


def test_garbage_is_a_cache_error():
    with pytest.raises(CacheError):
        codec.decode_array(b"not a zstd frame at all", "<u4", 4)


def test_compression_beats_raw_storage_on_peaked_ids():
    rng = np.random.default_rng(1)
    # Realistic ids: most mass on frequent (small) ids.
    ids = np.minimum(rng.zipf(1.3, size=(512, 64)), 262143)
    raw_bytes = ids.size * 4
    assert len(codec.encode_array(ids, "<u4")) < raw_bytes / 2
