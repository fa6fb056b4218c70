"""The project's exceptions.

Every error a user can cause derives from :class:`DistillError`; the command line turns
one into a single line on stderr and a non-zero exit. Each subclass also inherits the
builtin it resembles, so callers that catch ``ValueError`` or ``FileNotFoundError`` keep
working.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An underlying library error in one short line, for embedding in one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class DistillError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(DistillError, ValueError):
    """An option or setting is out of range or inconsistent."""


class SourceNotFoundError(DistillError, FileNotFoundError):
    """A model, tokenizer or dataset could not be found or loaded."""


class DatasetError(DistillError, ValueError):
    """The dataset is empty, lacks the text column, or cannot be read."""


class OutputExistsError(DistillError, FileExistsError):
    """The output folder is not empty and ``--overwrite`` was not given."""


class CacheError(DistillError, ValueError):
    """A cache is missing, incomplete, malformed or fails its checksums."""


class TokenizerMismatchError(DistillError, ValueError):
    """The student's tokenizer differs from the one the cache was made with."""


class TeacherError(DistillError, RuntimeError):
    """The teacher's outputs cannot be captured as the cache requires."""


class CacheLockedError(DistillError, RuntimeError):
    """Another teacher pass holds the cache folder's lock."""
