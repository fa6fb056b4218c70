"""The process-group plumbing and the teacher pass's split of the stream, in one process."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import PackedSequence
from pipeline.distributed import World, current_world, gpu_slice
from pipeline.errors import ConfigError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.teacher import StreamCount, owned_batches


def test_outside_torchrun_this_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    world = current_world()
    assert world == World() and world.is_main and not world.is_distributed
    assert world.broadcast_int(7) == 7 and world.sum_floats([1.5, 2.0]) == [1.5, 2.0] and world.max_int(3) == 3
    world.barrier()


@pytest.mark.parametrize(
    ("environment", "fragment"),
    [
        ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "outside WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "one", "LOCAL_RANK": "0"}, "RANK='one' is not an integer"),
    ],
)
def test_a_broken_launch_environment_is_refused_in_one_line(monkeypatch, environment, fragment):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=fragment):
        current_world()


def test_each_process_gets_an_equal_slice_of_the_gpus():
    assert gpu_slice(0, 8, 8) == [0] and gpu_slice(7, 8, 8) == [7]
    assert gpu_slice(1, 2, 8) == [4, 5, 6, 7]  # a teacher spread over 4 GPUs per process
    assert gpu_slice(1, 3, 8) == [2, 3]  # 8 // 3: GPUs 6 and 7 stay idle
    with pytest.raises(ConfigError, match="run at most 2 per node"):
        gpu_slice(0, 4, 2)


def sequences(count: int, seq_len: int = 4):
    return (PackedSequence(np.full(seq_len, index, dtype=np.int64), index, 0) for index in range(count))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_take_disjoint_shards_that_cover_the_stream_in_the_same_batches(world_size):
    count, rows_per_shard, batch_size = 23, 5, 2
    reference = TokenStreamHasher()
    for sequence in sequences(count):
        reference.update(sequence.input_ids)
    seen: list[tuple[int, list[int]]] = []
    for rank in range(world_size):
        hasher, counted = TokenStreamHasher(), StreamCount()
        batches = owned_batches(
            sequences(count),
            batch_size,
            rows_per_shard,
            lambda shard, rank=rank: shard % world_size == rank,
            hasher,
            counted,
        )
        for first, batch in batches:
            indexes = [int(packed.input_ids[0]) for packed in batch]
            assert indexes == list(range(first, first + len(batch)))
            assert len({index // rows_per_shard for index in indexes}) == 1  # never across a shard boundary
            assert (indexes[0] // rows_per_shard) % world_size == rank
            seen.append((first, indexes))
        assert counted.sequences == count and hasher.hexdigest() == reference.hexdigest()
    flat = sorted(index for _, indexes in seen for index in indexes)
    assert flat == list(range(count))  # no gaps, no duplicates
    # The batches are those of one process, whatever the world size.
    single = [
        first for first, _ in owned_batches(sequences(count), 2, 5, lambda _: True, TokenStreamHasher(), StreamCount())
    ]
    assert sorted(first for first, _ in seen) == single


def test_committed_shards_are_left_out_and_the_rest_still_hashed():
    hasher, counted = TokenStreamHasher(), StreamCount()
    batches = list(owned_batches(sequences(12), 4, 4, lambda shard: shard != 1, hasher, counted))
    assert [first for first, _ in batches] == [0, 8]
    assert counted.sequences == 12


class FlakyShardWriter:
    """Records the rows it is given; fails on the ``fail_at``-th."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.rows: list[int] = []
        self.fail_at = fail_at

    def add(self, seq_index, cells, n_tokens) -> None:
        if self.fail_at is not None and len(self.rows) + 1 == self.fail_at:
            raise OSError(28, "No space left on device")
        self.rows.append(seq_index)


def pending_rows(first: int, count: int):
    from concurrent.futures import Future

    from pipeline.row_writer import PendingRow

    rows = []
    for index in range(first, first + count):
        frames: Future = Future()
        frames.set_result({"input_ids": b"x"})
        rows.append(PendingRow(index, 0, 0, None, frames))
    return rows


def test_the_background_writer_writes_every_row_in_order():
    from pipeline.row_writer import BackgroundWriter

    target = FlakyShardWriter()
    with BackgroundWriter(target, 4, max_rows=2) as background:
        for first in range(0, 30, 3):
            background.put(pending_rows(first, 3))
    assert target.rows == list(range(30))


def test_a_write_failure_on_the_writer_thread_reaches_the_teacher_and_stops_the_writes():
    from pipeline.row_writer import BackgroundWriter

    target = FlakyShardWriter(fail_at=5)
    with pytest.raises(OSError, match="No space left"), BackgroundWriter(target, 4, max_rows=2) as background:
        for first in range(0, 300, 3):
            background.put(pending_rows(first, 3))
    assert target.rows == [0, 1, 2, 3]


def test_an_interrupted_teacher_still_writes_the_rows_it_captured():
    from pipeline.row_writer import BackgroundWriter

    target = FlakyShardWriter()
    with pytest.raises(KeyboardInterrupt), BackgroundWriter(target, 4, max_rows=64) as background:
        background.put(pending_rows(0, 3))
        raise KeyboardInterrupt
    assert target.rows == [0, 1, 2]  # whatever the thread's timing
    assert not background.thread.is_alive()
