"""The cache's file system: locks that hold across mounts and mount namespaces, and mounts whose locks would not."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdpipe import filesystems
from kdpipe.cache import StageCache
from kdpipe.cli import app
from kdpipe.errors import LockBusy
from kdpipe.filesystems import Mount, locking_problem, mount_of, parse_mountinfo

import helpers

# Lines in /proc/self/mountinfo's format (proc(5)), as NFS, Lustre and local mounts write them.
MOUNTINFO = textwrap.dedent(r"""
    25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
    40 25 0:50 / /shared rw,relatime shared:20 - nfs4 srv:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
    41 25 0:51 / /nfs3 rw,relatime shared:21 - nfs srv:/old rw,vers=3,local_lock=flock
    42 25 0:52 / /lustre rw,relatime shared:22 - lustre 10.0.0.2@tcp:/fs rw,flock
    43 25 0:53 / /scratch rw,relatime shared:23 - lustre 10.0.0.2@tcp:/fs2 rw,localflock
    44 25 0:54 / /plain\040lustre rw shared:24 - lustre 10.0.0.2@tcp:/fs3 rw
    45 40 0:55 / /shared/inner rw shared:25 - tmpfs tmpfs rw
""")


def test_each_mount_is_judged_by_its_type_and_lock_options():
    mounts = parse_mountinfo(MOUNTINFO)
    judged = {str(m.point): locking_problem(m) for m in mounts}
    assert judged["/"] is None and judged["/shared"] is None and judged["/lustre"] is None
    assert "local_lock=flock keeps flock locks on each machine" in judged["/nfs3"]
    assert "localflock" in judged["/scratch"] and "without -o flock" in judged["/plain lustre"]
    assert mount_of(Path("/shared/run/cache"), mounts).fstype == "nfs4"
    assert mount_of(Path("/shared/inner/cache"), mounts).fstype == "tmpfs"  # the longest mount point holds it
    assert mount_of(Path("/plain lustre/x"), mounts).point == Path("/plain lustre")  # \040 is a space
    assert locking_problem(Mount(Path("/"), "ext4", ("rw",))) is None


def test_a_cache_on_a_mount_whose_locks_stay_local_is_refused_by_name(tmp_path, monkeypatch):
    """Before any stage runs (here prepare): exit 2, the cache, the mount and what to use instead (the probe locks fine
    here; the mount's options say other machines would not see the lock)."""
    fake = tmp_path / "mountinfo"
    fake.write_text(MOUNTINFO + f"46 25 0:56 / {tmp_path} rw shared:26 - lustre 10.0.0.2@tcp:/fs4 rw,localflock\n")
    monkeypatch.setattr(filesystems, "MOUNTINFO", fake)
    result = CliRunner().invoke(app, ["prepare", f"--set=cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'cache'} is on lustre at {tmp_path}" in result.output and "localflock" in result.output
    assert "Traceback" not in result.output


def test_a_lock_held_in_another_mount_namespace_on_another_mount_holds(small_demo, tmp_path):
    """The cache on a second mount point (/dev/shm, a tmpfs), and its stage lock taken by a process in another
    mount namespace (unshare -m: as a second machine sees the same files through its own mount table). kdpipe
    here sees the lock, names the holder and builds nothing."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m)")
    shm = Path("/dev/shm")
    if not shm.is_dir() or mount_of(shm, parse_mountinfo(filesystems.MOUNTINFO.read_text())).point != shm:
        pytest.skip("needs /dev/shm as a mount of its own")
    root = Path(subprocess.check_output(["mktemp", "-d", "-p", str(shm)], text=True).strip())
    try:
        pipeline = helpers.make(helpers.STUDENT_RUN, small_demo, root / "cache")
        pipeline.cache.check_writable()
        key = pipeline.key("prepare")
        holder_code = ("import sys, time; from pathlib import Path; from kdpipe.cache import StageCache\n"
                       "with StageCache(Path(sys.argv[1])).lock('prepare', sys.argv[2]):\n"
                       "    print('held', flush=True); time.sleep(60)")
        holder = subprocess.Popen(["unshare", "-m", sys.executable, "-c", holder_code, str(root / "cache"), key],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(LockBusy, match=rf"pid {holder.pid} "):
                pipeline.ensure("prepare", wait=False)
            assert not (root / "cache" / "prepare" / key / "record.json").exists()
        finally:
            holder.kill()
            holder.wait()
        assert StageCache(root / "cache").record("prepare", key) is None
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)
