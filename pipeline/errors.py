"""Errors a user can act on. The CLI prints them without a traceback.

Exit codes follow the CLI convention: 1 for a failed run, 2 for a usage or
configuration error.
"""

import errno


class KdpipeError(Exception):
    """A failure caused by the user's data, files or environment, not by a bug."""

    exit_code = 1


class ConfigError(KdpipeError):
    """An invalid config value, unknown key or missing input file."""

    exit_code = 2


class LockBusy(KdpipeError):
    """Another process is building the same stage output."""


_DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file larger than this process may write (ulimit -f)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}
_RESUME = "nothing half-written is taken as done: fix it, then rerun the same command to resume"


def environment_error(exc: BaseException) -> KdpipeError | None:
    """The user's environment (a full disk, a read-only or unwritable folder) as one actionable message.

    Looks through the exception's chain (a worker's error arrives wrapped); None when the
    failure is something else.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_PROBLEMS:
            where = exc.filename or "writing the cache"
            return KdpipeError(f"{where}: {_DISK_PROBLEMS[exc.errno]}; {_RESUME}")
        if isinstance(exc, RuntimeError) and any(text in str(exc) for text in ("iostream error", "StreamWriter")):
            return KdpipeError(f"writing a checkpoint failed ({str(exc).splitlines()[0]}): is the disk full? {_RESUME}")
        exc = exc.__cause__ or exc.__context__
    return None
