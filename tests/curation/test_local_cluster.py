"""A local Ray head stops exactly its own processes: another cluster on the same machine keeps running; and it
listens on loopback only (no port of a test cluster is reachable from the network).

(`ray stop --force`, which the helper used before, kills every Ray process on the machine: another test session's,
or a user's own cluster when `make demo` finished.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from curation.cluster.local_cluster import LOOPBACK_ENV, LocalRayHead, _ray_bin, processes_of_cluster, ray_env


def _status(head: LocalRayHead) -> subprocess.CompletedProcess:
    # a client of a loopback-only head keeps 127.0.0.1 as its address with the same setting as the head
    return subprocess.run([_ray_bin(), "status", "--address", head.address], env=ray_env(LOOPBACK_ENV),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_stopping_one_local_head_leaves_another_running():
    with LocalRayHead(num_cpus=1) as keeper:
        first = LocalRayHead(num_cpus=1).start()
        first_marks = [first.temp_dir, f":{first.gcs_port} "]
        assert processes_of_cluster(first_marks), "the started head's processes are found"
        first.stop()
        assert processes_of_cluster(first_marks) == []
        kept = _status(keeper)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert processes_of_cluster([keeper.temp_dir])
    assert processes_of_cluster([keeper.temp_dir]) == []


def _listening_sockets() -> dict[str, str]:
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
            if not v6:
                addr = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))  # little-endian
            elif host == "00000000000000000000000001000000":
                addr = "::1"
            elif host.startswith("0000000000000000FFFF0000"):  # IPv4-mapped ::ffff:a.b.c.d, IPv4 word little-endian
                addr = ".".join(str(int(host[24:][i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                addr = f"[{host}]"  # any other IPv6 address (:: included) counts as beyond loopback
            out[inode] = addr
    return out


@pytest.mark.slow
def test_local_head_listens_on_loopback_only():
    """Ray turns --node-ip-address=127.0.0.1 into the machine's address and listens on every interface unless told
    not to: every listening socket of the head's processes must be on 127.0.0.1 or ::1."""
    with LocalRayHead(num_cpus=1) as head:
        listening = _listening_sockets()
        found = []
        for pid in processes_of_cluster([head.temp_dir, f":{head.gcs_port} "]):
            try:
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except OSError:  # ended meanwhile
                continue
            for fd in fds:
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.append((pid, listening[target[8:-1]]))
    assert found, "no listening socket found for the head's processes"
    exposed = [(pid, addr) for pid, addr in found if not (addr.startswith("127.") or addr == "::1")]
    assert not exposed, f"Ray head processes listening beyond loopback: {exposed}"


def test_a_local_address_where_no_head_listens_is_one_line_not_minutes_of_retries(tmp_path):
    """ray.init retries a GCS that is not there for minutes; the driver checks a 127.0.0.1 address first and says
    in one line (exit 2, as for every config error) that no head listens there."""
    import sys

    import yaml

    from curation.cluster.local_cluster import free_port

    port = free_port()  # bound and released: nothing listens on it now
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://127.0.0.1:9/a.jpg\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}, "stages": ["download"]}))
    repo = Path(__file__).resolve().parents[2]
    env = ray_env()
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(repo / "pipelines" / "curate.py"), "--config", str(tmp_path / "c.yaml"),
                           "--ray-address", f"127.0.0.1:{port}", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)  # a hang guard, not a deadline
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"config error: ray address 127.0.0.1:{port}: no Ray head listens there; start one (ray start "
                     "--head) or give the address it printed (ray.address, --ray-address or RAY_ADDRESS)"], proc.stderr


def test_only_local_addresses_are_checked_before_ray_init():
    """A head on another machine, Ray Client addresses and 'auto' are left to Ray: only it can tell if they are up."""
    from curation.cluster.local_cluster import prepare_to_join

    for address in (None, "", "auto", "ray://127.0.0.1:10001", "10.1.2.3:6379", "head.example:6379"):
        assert prepare_to_join(address) is None, address
