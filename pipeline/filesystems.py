"""What the cache's file system guarantees: kdpipe's locks and commits rely on two of them.

- **flock(2) that excludes across machines.** Stage locks (kdpipe.cache) keep two builders of one
  output apart, on one machine or several sharing the cache. Local disks, NFSv4 and NFSv3 (Linux
  emulates flock with byte-range locks the server sees), Lustre mounted `-o flock`, GPFS/Spectrum
  Scale and CephFS provide it. Some mounts accept flock but keep it per machine: NFS with
  `local_lock=flock` or `local_lock=all`, Lustre with `localflock`; Lustre's default `noflock`
  refuses it outright. Those are refused here by name, since the damage (two writers) would be
  silent.
- **Atomic rename within a folder.** Commits write beside their target and rename (kdpipe.atomic);
  POSIX file systems, NFS and Lustre do.

`check_cache_filesystem` runs when a pipeline opens its cache: it reads the mount's type and options
from /proc/self/mountinfo and takes a real lock and a rename on a probe file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kdpipe.errors import ConfigError

MOUNTINFO = Path("/proc/self/mountinfo")
# mount options that make flock local to each client, by file system type
LOCAL_ONLY_LOCKS = {"nfs": ("local_lock=flock", "local_lock=all"), "nfs4": ("local_lock=flock", "local_lock=all"),
                    "lustre": ("localflock",)}


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    options: tuple[str, ...]  # mount and super-block options together


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/PID/mountinfo text (proc(5): fields, ' - ', type, source, super options)."""
    mounts = []
    for line in text.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if len(parts) < 6 or len(rest) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), parts[4])  # a space is \040
        mounts.append(Mount(Path(point), rest[0], tuple(parts[5].split(",")) + tuple(rest[2].split(","))))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path`: the longest mount point that contains it (the last mounted, when stacked)."""
    path = path.resolve()
    holding = [m for m in mounts if path == m.point or m.point in path.parents]
    return max(reversed(holding), key=lambda m: len(m.point.parts), default=None)


def locking_problem(mount: Mount) -> str | None:
    """Why flock on this mount would not keep two machines' builders apart (None: nothing known against it)."""
    local = [option for option in LOCAL_ONLY_LOCKS.get(mount.fstype, ()) if option in mount.options]
    if local:
        return f"{mount.fstype} mounted with {local[0]} keeps flock locks on each machine"
    if mount.fstype == "lustre" and "flock" not in mount.options:
        return "lustre without -o flock has no flock locks"
    return None


def check_cache_filesystem(root: Path) -> None:
    """Refuse a cache whose file system cannot hold kdpipe's locks and commits (module docstring)."""
    mounts = parse_mountinfo(MOUNTINFO.read_text()) if MOUNTINFO.is_file() else []
    mount = mount_of(root, mounts)
    where = f"{mount.fstype} at {mount.point}" if mount else "its file system"
    problem = locking_problem(mount) if mount else None
    probe = root / f".probe.{os.getpid()}"
    try:
        with open(probe, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
        os.replace(probe, probe.with_name(probe.name + ".renamed"))
        probe = probe.with_name(probe.name + ".renamed")
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EXDEV):
            raise
        problem = f"{exc.strerror} ({where})"
    finally:
        probe.unlink(missing_ok=True)
    if problem:
        raise ConfigError(f"cache_dir: {root} is on {where}, whose locks cannot keep two builders apart: {problem}. "
                          "Put the cache on a local disk or a shared file system with cluster-wide flock (NFS "
                          "without local_lock, Lustre with -o flock, GPFS, CephFS)")
