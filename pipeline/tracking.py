"""Where the student pass's logged metrics also go: ``--report-to tensorboard`` (the ``tensorboard`` extra).

``metrics.jsonl`` stays the record; a sink receives the same lines. :class:`TensorBoardSink`
writes each numeric field of a line as a scalar ``train/FIELD`` at its step, and the
held-out results as ``eval/FIELD``, into ``--out``/``tensorboard`` (``tensorboard --logdir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


def check_available(report_to: str) -> None:
    """Refuse ``--report-to`` a tool that is not installed, before anything is written."""
    if report_to != "tensorboard":
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--report-to tensorboard needs TensorBoard; pip install 'distill-cache[tensorboard]'"
        ) from None


class TensorBoardSink:
    """Scalars for TensorBoard, from the ``metrics.jsonl`` lines and the held-out results."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line: every number but ``step`` as ``train/FIELD`` at ``step``."""
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def write_eval(self, results: dict[str, Any], step: int) -> None:
        for key, value in results.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"eval/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoSink:
    """``--report-to none``."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def write_eval(self, results: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_sink(report_to: str, out: Path) -> TensorBoardSink | NoSink:
    return TensorBoardSink(out) if report_to == "tensorboard" else NoSink()
