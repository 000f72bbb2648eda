"""The local Ray head of the demo and the tests listens on loopback only (issue 13 item 21).

Starts a real `ray start --head`: run it only where no other Ray on the machine matters (its `stop()` is
`ray stop --force`, as in test_ray_job.py)."""

import os
import tempfile
from pathlib import Path

import pytest

from curation.local_cluster import LocalRayHead


def _listening_inodes() -> dict[str, str]:
    """{socket inode: local address} of every listening TCP socket (IPv4 and IPv6) of this machine."""
    out = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":  # LISTEN
                continue
            host = local.split(":")[0]
            if v6:
                words = [host[i:i + 8] for i in range(0, 32, 8)]
                addr = ":".join(w[6:8] + w[4:6] + w[2:4] + w[0:2] for w in words)  # little-endian 32-bit words
                addr = {"00000000000000000000000000000000": "::", "00000000000000000000000001000000": "::1"}.get(
                    host, addr)
            else:
                addr = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out[inode] = addr
    return out


def _sockets_of_processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, listening address) for every process whose command line contains `text`."""
    listening = _listening_inodes()
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if text not in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.append((int(pid_dir.name), listening[target[8:-1]]))
        except OSError:  # the process ended, or is not ours to read
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
def test_local_head_listens_on_loopback_only():
    temp_dir = tempfile.mkdtemp(prefix="lvdray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    with LocalRayHead(num_cpus=1, temp_dir=temp_dir) as head:
        sockets = _sockets_of_processes_mentioning(temp_dir)
        assert head.address.startswith("127.0.0.1:")
    assert sockets, "no listening socket found for the head's processes"
    exposed = [(pid, addr) for pid, addr in sockets if addr not in ("127.0.0.1", "::1")]
    assert not exposed, f"Ray head processes listening beyond loopback: {exposed}"
