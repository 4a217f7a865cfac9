"""The one place where store exceptions become errno values for the kernel."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from journal.errors import FsError, StoreError
from journal.integrity import DamagedValue

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
    """Raise FuseOSError with the right errno for anything the store raises.

    A damaged value is never served: the call fails with EIO, unless the store repairs
    the value (from a peer) on the spot, and then the call is made once more."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: object, **kwargs: object) -> object:
        try:
            try:
                return method(self, *args, **kwargs)
            except DamagedValue as exc:
                if not self.store.handle_damage(exc):
                    raise
            return method(self, *args, **kwargs)
        except FuseOSError:
            raise
        except FsError as exc:
            raise FuseOSError(exc.errno) from exc
        except DamagedValue as exc:
            self.store.handle_damage(exc)  # counted and logged once, there
            raise FuseOSError(errno.EIO) from exc
        except (StoreError, lmdb.Error) as exc:
            # The store itself failed: say so loudly, and fail this call safely.
            log.exception("%s failed in the store", method.__name__)
            raise FuseOSError(to_errno(exc)) from exc

    return wrapper  # type: ignore[return-value]
