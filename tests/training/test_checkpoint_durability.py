"""A checkpoint survives a power loss, not only a kill -9: its data is flushed before the rename that publishes it,
and the checkpoints folder's new entry after it (an atomic rename alone can still vanish, or name a file whose data
never reached the disk). Observed through the real ``os.fsync`` / ``os.replace``, wrapped to record what they
were given, in both layouts (one ``.pt`` file, and the DCP directory of a process group)."""

import os
import socket
import stat

import pytest
import torch

from training import checkpoint


@pytest.fixture
def calls(monkeypatch):
    """Every fsync (("fsync", path, is a directory)) and replace (("replace", src, dst)), in order."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst, **kw):
        seen.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def _publish(calls, final):
    """(what was flushed before the rename that created `final`, what was flushed after it, its source)."""
    i = next(i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == str(final))
    before = {(c[1], c[2]) for c in calls[:i] if c[0] == "fsync"}
    after = {(c[1], c[2]) for c in calls[i + 1:] if c[0] == "fsync"}
    return before, after, calls[i][1]


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fd paths from Linux /proc")


def test_single_process_checkpoint_is_flushed_then_renamed_then_its_folder_flushed(tmp_path, calls):
    path = checkpoint.save_checkpoint(tmp_path, {"iteration": 5, "w": torch.ones(3)})
    before, after, src = _publish(calls, path)
    assert (src, False) in before, "the checkpoint's data was not flushed before it was published"
    assert (str(path.parent), True) in after, "the checkpoints folder was not flushed after the rename"
    assert torch.load(path)["iteration"] == 5


def test_distributed_checkpoint_directory_is_flushed_then_renamed_then_its_folder_flushed(tmp_path, calls):
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        final = checkpoint.save_distributed_checkpoint(
            tmp_path, {"student": {"w": torch.ones(3)}}, {"iteration": 7}, checkpoint.rng_state())
    finally:
        dist.destroy_process_group()
    before, after, src = _publish(calls, final)
    flushed = {os.path.basename(p) for p, is_dir in before if not is_dir and os.path.dirname(p) == src}
    assert {"meta.pt", "rng_rank0.pt"} <= flushed, f"files written into the checkpoint were not flushed: {flushed}"
    assert (src, True) in before, "the checkpoint directory's entries were not flushed before it was published"
    assert (str(final.parent), True) in after, "the checkpoints folder was not flushed after the rename"
    assert checkpoint.load_checkpoint_meta(final)["iteration"] == 7
