"""Errors raised by the storage layer.

Every error is a `StorageError`; bad input is also a `ValueError` and an unknown id is also
a `KeyError`, so callers (the HTTP layer) can map them to 4xx answers without knowing this
module, and generic code that catches the builtin kinds keeps working.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of everything this package raises on purpose."""


class InvalidInputError(StorageError, ValueError):
    """The caller passed something the store refuses; nothing was written."""


class ExemplarValidationError(InvalidInputError):
    """An exemplar memory of the wrong dtype, rank or image shape."""


class LabelValidationError(InvalidInputError):
    """A class name that is empty, too long, padded or not printable."""


class JobValidationError(InvalidInputError):
    """An update job with bad samples, labels or overrides."""


class JobTooLargeError(JobValidationError):
    """An update job over the size limit."""


class MetadataError(InvalidInputError):
    """Version metadata or tensors that cannot be stored."""


class _NotFound(StorageError, KeyError):
    # KeyError.__str__ quotes its argument; these carry sentences, so print them plainly.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UnknownJobError(_NotFound):
    """No job with that id."""


class UnknownVersionError(_NotFound):
    """No saved model version with that number."""


class UnknownLabelError(_NotFound):
    """No class with that name in the label map."""


class VersionExistsError(StorageError, ValueError):
    """A version number that is already saved; versions are immutable."""


class VersionLockedError(StorageError, RuntimeError):
    """Another process is saving the same version number right now."""


class PinnedError(StorageError, RuntimeError):
    """The pointer is pinned; the operation needs an unpin first."""


class RejectedVersionError(StorageError, RuntimeError):
    """A pin or set of a version the promotion gate rejected (promote it instead)."""


class NotRejectedError(StorageError, RuntimeError):
    """A promote of a version the gate did not reject."""


class NoPreviousVersionError(StorageError, LookupError):
    """A rollback with no earlier version in the pointer history."""


class IdempotencyConflictError(StorageError, ValueError):
    """An idempotency key already used, within its 24 hours, for a different request: the
    earlier job stands and nothing was written (HTTP 409)."""


class JobStateError(StorageError, RuntimeError):
    """A job operation that does not fit the job's state (e.g. completing a failed job)."""


class StoreUnavailableError(StorageError):
    """Redis did not answer: connection refused or lost, a timeout, a server still loading.

    The operation may or may not have run (a lost reply); every write of this package is
    one transaction, so it ran whole or not at all. Retry later.
    """


class StoreResponseError(StorageError):
    """Redis answered with an error (out of memory, read-only replica, a bad command...)."""


class MemoryGenerationError(StorageError, LookupError):
    """A version whose exemplar memory generation is missing: it names none (saved without a
    memory) or its generation was garbage-collected (see `storage.versions`). A step must not
    be built on it with some other memory."""
