"""The one place where store exceptions become errno values for the kernel."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import lmdb

from journal.errors import FsError, StoreError

from .binding import FuseOSError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def to_errno(exc: BaseException) -> int:
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, lmdb.MapFullError):
        return errno.ENOSPC
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(method: F) -> F:
    """Raise FuseOSError with the right errno for anything the store raises."""

    @functools.wraps(method)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return method(*args, **kwargs)
        except FuseOSError:
            raise
        except FsError as exc:
            raise FuseOSError(exc.errno) from exc
        except (StoreError, lmdb.Error) as exc:
            # The store itself failed: say so loudly, and fail this call safely.
            log.exception("%s failed in the store", method.__name__)
            raise FuseOSError(to_errno(exc)) from exc

    return wrapper  # type: ignore[return-value]
