"""One exception family: every error Patchify raises on purpose is a `PatchifyError`.

Each concrete error also derives from the built-in type callers already catch for it (ValueError for bad input,
RuntimeError for missing weights), so `except ValueError` keeps working. This module imports nothing heavy: the
C++ bindings import it at load time to raise `CoreError`.
"""
from __future__ import annotations


class PatchifyError(Exception):
    """Base of every error Patchify raises on purpose."""


class CoreError(PatchifyError, ValueError):
    """Raised by the compiled core (patchify._core) on bad arguments: wrong shape, dtype, size or state."""


class ImageError(PatchifyError, ValueError):
    """An image that cannot be used; `source` names it and `reason` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across processes (two-argument init)
        return (type(self), (self.source, self.reason))


class ImageTooLargeError(ImageError):
    """An image refused for its size (more pixels than max_pixels, or than Pillow decodes safely), before decoding:
    a service answers it as 413, not as a bad file."""


class IndexFormatError(PatchifyError, ValueError):
    """A folder that is not a usable Patchify index (missing, damaged, mismatched or unsupported files)."""


class BackboneMismatchError(PatchifyError, ValueError):
    """An index was built with another backbone (model, weights or preprocessing) than the one given."""


class WeightsUnavailableError(PatchifyError, RuntimeError):
    """A backbone's weights cannot be found offline. The message lists the ways to get them."""


class ReadOnlyIndexError(PatchifyError):
    """A change (add, remove) asked of an index that cannot take one, e.g. a sharded index (rebuilt, not edited)."""
