"""Precise exceptions of the store. Each names the errno a POSIX caller should see, and
the FUSE edge (fs/errors.py) is the one place that turns them into FuseOSError."""

from __future__ import annotations

import errno


class FsError(Exception):
    """A filesystem-level refusal: the operation is invalid against the current state."""

    errno = errno.EIO


class NotFound(FsError):
    errno = errno.ENOENT


class AlreadyExists(FsError):
    errno = errno.EEXIST


class NotADirectory(FsError):
    errno = errno.ENOTDIR


class IsADirectory(FsError):
    errno = errno.EISDIR


class DirectoryNotEmpty(FsError):
    errno = errno.ENOTEMPTY


class InvalidArgument(FsError):
    """E.g. renaming a directory into its own subtree."""

    errno = errno.EINVAL


class NameTooLong(FsError):
    errno = errno.ENAMETOOLONG


class NotPermitted(FsError):
    """E.g. a hard link to a directory."""

    errno = errno.EPERM


class NoSuchAttribute(FsError):
    errno = errno.ENODATA


class AttributeTooLarge(FsError):
    errno = errno.E2BIG


class StoreFull(FsError):
    """The LMDB map is full: the operation was rolled back whole."""

    errno = errno.ENOSPC


class ReadOnly(FsError):
    """This node does not accept writes (a standby, or a fenced primary)."""

    errno = errno.EROFS


class FileTooLarge(FsError):
    errno = errno.EFBIG


class StoreError(Exception):
    """The store itself is unusable or inconsistent (not a user error)."""


class StoreDamaged(StoreError):
    """The store's file is damaged or truncated: nothing in it can be trusted as it is;
    the node is rebuilt from a standby (tools exit 1 saying so)."""


class CorruptRecord(StoreError):
    """A journal record or wire message failed to decode or verify."""


class SequenceGap(StoreError):
    """A record does not follow the last applied seq."""


class WrongCluster(StoreError):
    """A record or store belongs to another cluster."""


class StaleEpoch(StoreError):
    """A record of an epoch older than the records before it: written by a deposed primary."""
