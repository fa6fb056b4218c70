"""Offline knowledge distillation of language models from a cached teacher.

``open_cache`` and ``CacheDataset`` read a cache written by ``distill teacher-cache``.
"""

from pipeline.cache import Cache, CacheDataset, open_cache
from pipeline.errors import DistillError
from pipeline.rows import SparseRow

__all__ = ["Cache", "CacheDataset", "DistillError", "SparseRow", "open_cache"]
__version__ = "0.1.0"
