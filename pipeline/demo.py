"""The demo's corpus and its closing report.

``python -m pipeline.demo corpus OUT_DIR`` writes the embedded default dataset: the
reference topics that ship with Python (``pydoc_data.topics``, about 460 KB of English
prose and code), one JSON line per topic, split by topic name into ``train.jsonl`` and
``heldout.jsonl`` (every eighth topic in sorted order is held out). No download needed.

``python -m pipeline.demo report KD_DIR CE_DIR`` prints the held-out figures of a
distilled student beside a cross-entropy-only student trained on the same budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELDOUT_EVERY = 8


def write_corpus(out_dir: str | Path) -> dict[str, int]:
    """Write ``train.jsonl`` and ``heldout.jsonl``; return the number of topics in each."""
    from pydoc_data.topics import topics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "heldout": []}
    for index, name in enumerate(sorted(topics)):
        split = "heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
        lines[split].append(json.dumps({"topic": name, "text": topics[name]}, ensure_ascii=False) + "\n")
    counts = {split: len(rows) for split, rows in lines.items()}
    for split, rows in lines.items():
        (out / f".{split}.jsonl.tmp").write_text("".join(rows), encoding="utf-8")
    for name in counts:
        (out / f".{name}.jsonl.tmp").replace(out / f"{name}.jsonl")
    return counts


def report(kd_dir: str | Path, ce_dir: str | Path) -> str:
    """A small table of held-out KL, cross-entropy and perplexity for two student runs."""
    lines = [f"{'student':<34} {'KL(teacher||student)':>21} {'cross-entropy':>14} {'perplexity':>11} {'train s':>8}"]
    for label, folder in (("distilled (KD + CE)", kd_dir), ("cross-entropy only (same budget)", ce_dir)):
        training = json.loads((Path(folder) / "training.json").read_text())
        scores = training["eval"]
        lines.append(
            f"{label:<34} {scores['kl']:>21.4f} {scores['ce']:>14.4f} {scores['perplexity']:>11.1f} "
            f"{training['seconds']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "corpus":
        counts = write_corpus(args[1])
        print(f"corpus: {counts['train']} train topics, {counts['heldout']} held-out topics in {args[1]}")
        return 0
    if len(args) == 3 and args[0] == "report":
        print(report(args[1], args[2]))
        return 0
    print("usage: python -m pipeline.demo corpus OUT_DIR | report KD_DIR CE_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
