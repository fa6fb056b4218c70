"""Build the two local lm-evaluation-harness tasks from text that ships with Python (``pydoc_data.topics``).

    python data/lm_eval_tasks/make_tasks.py     # rewrites pydoc_cloze.jsonl and pydoc_perplexity.jsonl

- ``pydoc_cloze`` (multiple choice): a sentence of a reference topic with its last word
  left out, and four candidate words: the true one and three drawn from other sentences.
- ``pydoc_perplexity`` (rolling log-likelihood): whole paragraphs of the topics.

Topics are taken in sorted order, every eighth one (the demo's held-out topics, see
``pipeline/demo.py``), and the draws are seeded, so the files depend only on the Python
version's topics.
"""

import json
import random
import re
from pathlib import Path
from pydoc_data.topics import topics

HERE = Path(__file__).resolve().parent
CLOZE_ITEMS = 60
PERPLEXITY_DOCS = 20


def heldout_topics() -> list[str]:
    return [topics[name] for index, name in enumerate(sorted(topics)) if index % 8 == 7]


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    found = re.findall(r"[A-Z][^.!?]{40,200}[a-z]{3,}[.]", flat)
    return [s for s in found if "*" not in s and "`" not in s and "=" not in s]


def main() -> None:
    rng = random.Random(0)
    pool = [s for text in heldout_topics() for s in sentences(text)]
    rng.shuffle(pool)
    words = sorted({s.rstrip(".").split()[-1] for s in pool})
    cloze = []
    for sentence in pool[:CLOZE_ITEMS]:
        *head, last = sentence.rstrip(".").split()
        distractors = rng.sample([w for w in words if w != last], 3)
        choices = [last, *distractors]
        rng.shuffle(choices)
        cloze.append({"context": " ".join(head), "choices": choices, "answer": choices.index(last)})
    paragraphs = [p.strip() for text in heldout_topics() for p in text.split("\n\n") if 200 <= len(p.strip()) <= 1200]
    perplexity = [{"text": p} for p in paragraphs[:PERPLEXITY_DOCS]]
    for name, rows in (("pydoc_cloze", cloze), ("pydoc_perplexity", perplexity)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{name}: {len(rows)} documents")


if __name__ == "__main__":
    main()
