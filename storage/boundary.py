"""The storage boundary: what redis-py raises leaves this package as a `StorageError`.

Every public method of the stores (and the public functions of `storage.connection`) is
wrapped: a connection refused or lost, a timeout or a server still loading becomes
`StoreUnavailableError`, any other Redis error `StoreResponseError`, each with the Redis
error as its cause. Callers (server, learner) catch `storage.errors` types only and never
import redis. Inside the package the redis-py types are still seen where they mean
something (a BUSYGROUP reply, the WatchError that makes `Redis.transaction` retry).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis

from .errors import StorageError, StoreResponseError, StoreUnavailableError

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)

# Errors that say "no usable server right now" rather than "the server refused this".
_UNAVAILABLE: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError,  # includes BusyLoadingError (a server loading its data)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during a failover
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def translate(e: redis.RedisError) -> StorageError:
    """The `StorageError` that stands for a redis-py error."""
    what = f"{type(e).__name__}: {e}"
    if isinstance(e, _UNAVAILABLE):
        return StoreUnavailableError(f"the store (Redis) is unreachable: {what}")
    return StoreResponseError(f"the store (Redis) refused a command: {what}")


def boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap `fn` so that redis-py errors leave it as storage errors."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.WatchError:
            raise  # Redis.transaction's retry signal, never a failure of ours
        except redis.RedisError as e:
            raise translate(e) from e

    wrapper.__storage_boundary__ = True  # type: ignore[attr-defined]
    return wrapper


_WRAPPED_DUNDERS = ("__init__", "__len__")


def guarded(cls: C) -> C:
    """Class decorator: `boundary` on every public method (and ``__init__``, ``__len__``)."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_") and name not in _WRAPPED_DUNDERS:
            continue
        if isinstance(attr, staticmethod | classmethod):
            setattr(cls, name, type(attr)(boundary(attr.__func__)))
        elif callable(attr) and not isinstance(attr, type):
            setattr(cls, name, boundary(attr))
    return cls
