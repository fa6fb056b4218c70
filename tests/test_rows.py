"""Rows of different captures stack into one batch shape, padded where a position captured fewer ids."""

import numpy as np

from pipeline.rows import SparseRow, stack_numpy


def test_variable_length_rows_pad_to_the_widest_with_a_mask():
    narrow = SparseRow(
        input_ids=np.arange(2),
        ids=np.array([[5, 0], [7, 8]]),
        logprobs=np.array([[-0.1, -np.inf], [-0.5, -1.0]], np.float32),
        tail_logmass=np.array([-2.3, -1.2], np.float32),
        lengths=np.array([1, 2], np.int32),
    )
    wide = SparseRow(
        input_ids=np.arange(2),
        ids=np.array([[1, 2, 3], [4, 5, 6]]),
        logprobs=np.full((2, 3), -1.5, np.float32),
        tail_logmass=np.full(2, -3.0, np.float32),
    )
    batch = stack_numpy([narrow, wide])
    assert batch["ids"].shape == batch["logprobs"].shape == batch["valid"].shape == (2, 2, 3)
    np.testing.assert_array_equal(batch["valid"][0], [[True, False, False], [True, True, False]])
    assert batch["valid"][1].all()
    assert np.isneginf(batch["logprobs"][0, 0, 1:]).all() and (batch["ids"][0, :, 2] == 0).all()
    assert "counts" not in batch


def test_a_field_one_row_lacks_is_left_out_of_the_batch():
    with_counts = SparseRow(np.arange(1), np.array([[3]]), None, None, counts=np.array([[2]], np.int32))
    without = SparseRow(np.arange(1), np.array([[4]]), np.zeros((1, 1), np.float32), np.zeros(1, np.float32))
    batch = stack_numpy([with_counts, without])
    assert set(batch) == {"input_ids", "ids", "valid"}
