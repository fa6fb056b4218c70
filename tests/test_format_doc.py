"""docs/FORMAT.md's recipe for reading a cache with pyarrow alone must keep working."""

import re
from pathlib import Path

import numpy as np

import pipeline

FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def test_the_documented_pyarrow_recipe_reads_the_same_rows(train_cache):
    blocks = re.findall(r"```python\n(.*?)```", FORMAT_DOC.read_text(), re.S)
    namespace: dict = {}
    exec(blocks[0], namespace)  # decode()
    exec(blocks[1].replace('cache = "caches/demo"', f"cache = {str(train_cache)!r}"), namespace)
    last = list(pipeline.open_cache(train_cache))[-1]
    np.testing.assert_array_equal(namespace["input_ids"], last.input_ids)
    np.testing.assert_array_equal(namespace["topk_ids"], last.topk_ids)
    np.testing.assert_array_equal(namespace["topk_logprobs"], last.topk_logprobs)
    np.testing.assert_array_equal(namespace["tail_logmass"], last.tail_logmass)
