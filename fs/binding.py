"""The FUSE binding: mfusepy (libfuse3) by default, fusepy (libfuse2) on request.

Both speak the fusepy API. `TANDEMFS_FUSE=fusepy` selects the libfuse2 binding; the
docs/benchmarks.md says why libfuse3 is the default. The `FUSE` subclass here
fixes two places where the bindings lose information the filesystem needs: rename flags
(RENAME_NOREPLACE / RENAME_EXCHANGE, libfuse3 only) and the UTIME_NOW / UTIME_OMIT
markers of utimensat, whose tv_sec libfuse leaves uninitialised. It also spares create
a signature inspection per call, lets read fill libfuse's buffer itself (one copy,
made without the GIL) instead of returning bytes for the binding to copy, and keeps the
libfuse handle that `invalidate_path` needs outside a FUSE worker thread.
"""

from __future__ import annotations

import ctypes
import os

NAME = os.environ.get("TANDEMFS_FUSE", "mfusepy")

if NAME == "fusepy":
    import fuse as _binding
elif NAME == "mfusepy":
    # mfusepy looks for libfuse2 first; tandemfs wants libfuse3 where it is installed.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy as _binding
else:  # pragma: no cover - a configuration error, reported at start
    raise ImportError(f"TANDEMFS_FUSE must be 'mfusepy' or 'fusepy', not {NAME!r}")

FuseOSError = _binding.FuseOSError
Operations = _binding.Operations
fuse_get_context = _binding.fuse_get_context
LIBFUSE_MAJOR = getattr(_binding, "fuse_version_major", 2)

_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
#: Markers in the `times` tuple handed to Operations.utimens.
UTIME_NOW = "now"
UTIME_OMIT = "omit"


def _timespec(ts: object) -> int | str:
    nsec = ts.tv_nsec  # type: ignore[attr-defined]
    if nsec == _UTIME_NOW:
        return UTIME_NOW
    if nsec == _UTIME_OMIT:
        return UTIME_OMIT
    return ts.tv_sec * 1_000_000_000 + nsec  # type: ignore[attr-defined]


def _times(buf: object) -> tuple[int | str, int | str] | None:
    if not buf:
        return None
    return _timespec(buf.contents.actime), _timespec(buf.contents.modtime)  # type: ignore[attr-defined]


#: Whether the kernel's cached attributes of a path can be dropped (libfuse3's
#: fuse_invalidate_path; libfuse2's fuse_invalidate does nothing).
CAN_INVALIDATE = LIBFUSE_MAJOR >= 3 and hasattr(getattr(_binding, "_libfuse", None), "fuse_invalidate_path")

#: The struct fuse of the running mount, taken in init (one mount per process).
_fuse_handle: int | None = None


def invalidate_path(path: str) -> None:
    """Drop what the kernel caches of `path`'s node (attributes and pages); callable from
    any thread. A path the kernel holds no node for is nothing to drop."""
    if not CAN_INVALIDATE or _fuse_handle is None:
        return
    lib = _binding._libfuse
    if lib.fuse_invalidate_path.argtypes is None:
        lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.fuse_invalidate_path.restype = ctypes.c_int
    lib.fuse_invalidate_path(ctypes.c_void_p(_fuse_handle), os.fsencode(path))


class FUSE(_binding.FUSE):
    def __init__(self, operations: object, *args: object, **kwargs: object) -> None:
        self._read_into = getattr(operations, "read_into", None)
        super().__init__(operations, *args, **kwargs)  # mounts and, in the foreground, serves

    if CAN_INVALIDATE:

        def init_fuse_3(self, conn: object, config: object) -> None:
            global _fuse_handle
            _fuse_handle = _binding._libfuse.fuse_get_context().contents.fuse
            super().init_fuse_3(conn, config)

        def destroy(self, private_data: object) -> None:
            global _fuse_handle
            _fuse_handle = None  # libfuse frees it once the loop ends
            return super().destroy(private_data)

    def read(self, path: bytes | None, buf: object, size: int, offset: int, fip: object) -> int:
        # The bindings copy the answer of Operations.read into `buf`; read_into fills it.
        if self._read_into is None:
            return super().read(path, buf, size, offset, fip)
        return self._read_into(
            None if path is None else path.decode(self.encoding, getattr(self, "errors", "strict")),
            ctypes.cast(buf, ctypes.c_void_p).value, size, offset, fip.contents.fh)  # type: ignore[attr-defined]

    if NAME == "mfusepy":

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(
                old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags)

        def create(self, path: bytes, mode: int, fip: object) -> int:
            # mfusepy inspects the operation's signature on every create; ours is known.
            fi = fip.contents  # type: ignore[attr-defined]
            fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
            return 0

        def utimens_fuse_2(self, path: bytes | None, buf: object) -> int:
            return self.operations.utimens(
                None if path is None else path.decode(self.encoding, self.errors), _times(buf))

        def utimens_fuse_3(self, path: bytes | None, buf: object, fip: object) -> int:
            return self.utimens_fuse_2(path, buf)

    else:

        def utimens(self, path: bytes, buf: object) -> int:
            return self.operations("utimens", path.decode(self.encoding), _times(buf))


def session_exiting() -> bool:
    """Called from a FUSE worker thread: is libfuse shutting the session down?

    On SIGTERM/SIGINT libfuse marks its session as exited and then waits for every busy
    worker, so an fsync blocked waiting for a standby (block mode) would hold the process
    forever. A waiting worker polls this and gives up instead. Both bindings load libfuse
    as `_libfuse`; if that is unavailable the answer is False (waits go on).
    """
    try:
        lib = _binding._libfuse
        if lib.fuse_get_session.restype is not ctypes.c_void_p:
            lib.fuse_get_session.restype = ctypes.c_void_p
            lib.fuse_get_session.argtypes = [ctypes.c_void_p]
            lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
        context = lib.fuse_get_context()
        if not context or not context.contents.fuse:
            return False
        session = lib.fuse_get_session(ctypes.c_void_p(context.contents.fuse))
        return bool(session) and bool(lib.fuse_session_exited(ctypes.c_void_p(session)))
    except (AttributeError, ValueError):
        return False
