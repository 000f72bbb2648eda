"""A real local Ray head for the demo and the tests, and `ray job submit` against it.

Ray 2.60 turns on token authentication for `ray start --head` as soon as ``~/.ray/auth_token`` exists, which any
earlier local ``ray.init()`` creates; a client without ``RAY_AUTH_MODE=token`` is then refused.  We make both
sides agree: a token is generated when missing and every ray command we run gets ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


#: On Linux, `ray start --node-ip-address=127.0.0.1` replaces 127.0.0.1 by the machine's own address, and the GCS,
#: raylet and object manager then listen on every interface.  With this variable Ray keeps a loopback node address
#: (what it does on macOS/Windows, where it supports no multi-node clusters), and its servers bind to 127.0.0.1 only.
#: The head accepts no other node then, which is what a local head is for.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _node_args(num_cpus: int | None, resources: dict | None) -> list[str]:
    """`ray start` options for one node: CPUs, custom resources, and free ports for its agents (two raylets on one
    machine would otherwise both take the default agent ports)."""
    import json

    args = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at host:port (a refusal comes back at once on a live host)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def prepare_to_join(address: str | None) -> str | None:
    """Call before ``ray.init(address=...)`` in a driver; returns a line to print, or None.

    Ray rewrites a head address of 127.0.0.1 or localhost into this machine's own address before connecting.  A
    head that listens on every interface (plain `ray start --head`) answers there; one bound to loopback (a
    :class:`LocalRayHead`, or `ray start` under :data:`LOOPBACK_ENV`) does not, and ray.init then retries its
    GCS for minutes while the head is up on 127.0.0.1.  Such a head is joined as what it is (the driver gets the
    same loopback setting), and an address where nothing listens at all is one line instead of that wait."""
    if not address or address == "auto" or "://" in address:
        return None  # the running cluster Ray finds itself, or a Ray Client address: Ray's own rules apply
    from ray._private import ray_constants, services

    host, _, port_text = address.rpartition(":")
    # services.is_localhost is the test of the rewrite itself, so this check and Ray's agree on which hosts move
    if not services.is_localhost(host) or not port_text.isdigit():
        return None  # a head on another machine: only Ray can tell whether it is up
    if not ray_constants.ENABLE_RAY_CLUSTER:
        return None  # the loopback setting is already on: Ray keeps 127.0.0.1
    port = int(port_text)
    node_ip = services.node_ip_address_from_perspective()
    if not services.is_localhost(node_ip) and _answers(node_ip, port):
        return None  # a head on every interface: Ray's rewrite reaches it
    if not _answers("127.0.0.1", port):
        from curation.config_base import ConfigError

        raise ConfigError(f"config error: ray address {address}: no Ray head listens there; start one "
                          "(ray start --head) or give the address it printed (ray.address, --ray-address or "
                          "RAY_ADDRESS)")
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at each address lookup, set from the environment at import
    return f"ray: the head at {address} listens on 127.0.0.1 only; joining it as a one-machine cluster"


def ray_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bindir = str(Path(sys.executable).parent)
    if not env.get("PATH", "").startswith(bindir):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def ensure_token() -> None:
    subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=ray_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process we can read (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; comm may hold spaces
        table[int(entry.name)] = (ppid, cmdline)
    return table


def _with_descendants(table: dict[int, tuple[int, str]], roots: set[int]) -> set[int]:
    """`roots` and every process below them in `table` (this process excluded)."""
    found = set(roots)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                stack.append(child)
    return found


def descendants(pid: int) -> list[int]:
    """Pids of every living process below `pid` (its children, theirs, ...), from Linux /proc."""
    return sorted(p for p in _with_descendants(_proc_table(), {pid}) if p != pid and process_alive(p))


def process_alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (dead, its exit status not yet collected) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_of_cluster(marks: list[str], table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """Pids of the Ray processes whose command line names one of `marks` (the cluster's temp dir or GCS port),
    and all their descendants (workers rename themselves ``ray::IDLE``, so they are found through their raylet);
    `table`: a process table already read (:func:`_proc_table`)."""
    table = _proc_table() if table is None else table
    found = {pid for pid, (_, cmd) in table.items() if pid != os.getpid() and any(m in cmd for m in marks)}
    return sorted(_with_descendants(table, found))


#: the GCS server's command: the process the others report their shutdown to
GCS_SERVER = "/gcs/gcs_server"


def stop_cluster_processes(marks: list[str], grace_s: float = 10.0) -> int:
    """SIGTERM, then after `grace_s` SIGKILL, the processes of one local cluster only.

    Every process but the GCS server first: they shut down while the GCS still answers them (measured with Ray
    2.x: in under a second; with the GCS signalled too, the raylet and the GCS were both still up 12 s later),
    then the GCS, which has nothing left to serve, is killed.  ``ray stop --force`` would kill every Ray process
    on the machine, including other users' clusters and other test sessions; this stops exactly the one we
    started.  Returns how many processes were signalled."""
    table = _proc_table()
    pids = processes_of_cluster(marks, table)
    rest = [pid for pid in pids if GCS_SERVER not in table.get(pid, (0, ""))[1]]
    for sig, targets in ((signal.SIGTERM, rest), (signal.SIGKILL, pids)):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(process_alive(pid) for pid in targets):
            time.sleep(0.2)
    return len(pids)


#: a line of the `ray job submit` client's own logger: "2026-12-07 11:22:02,090\tINFO cli.py:42 -- text"
_RAY_CLI_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|SUCC|ERROR)\s+\S+:\d+ -- (.*)$")
_JOB_STATE = re.compile(r"Job '(\S+)' (submitted successfully|succeeded|failed|stopped)")
#: Ray warnings about what it does anyway and the repository's .rayignore already does (skip .git/, .venv/)
_EXPECTED_WARNINGS = ("is now ignored by default when packaging the working directory",)


def quiet_job_line(line: str) -> str | None:
    """What the `ray job submit` client prints, reduced to what a user needs: the job's own log as it is, one line
    when the job is submitted (with how to stop it) and one when it ends; Ray's INFO chatter (addresses, uploads,
    next steps, web sockets) and its expected warnings dropped, other warnings and errors kept."""
    m = _RAY_CLI_LINE.match(line.rstrip("\n"))
    if m is None:
        return None if line.startswith("Running entrypoint for job ") else line
    level, text = m.groups()
    state = _JOB_STATE.search(text)
    if state:
        job, what = state.groups()
        if what == "submitted successfully":
            return f"ray: job {job} submitted (ray job stop {job} ends it)\n"
        return f"ray: job {job} {what}\n"
    if level == "ERROR" or (level == "WARNING" and not any(w in text for w in _EXPECTED_WARNINGS)):
        return f"ray {level.lower()}: {text}\n"
    return None


class RayJobClient:
    """Submits jobs to a Ray cluster's dashboard (http://HEAD:8265) with `ray job submit`."""

    def __init__(self, dashboard_url: str):
        self._dashboard_url = dashboard_url

    @property
    def dashboard_url(self) -> str:
        return self._dashboard_url

    def submit(self, entrypoint: list[str], working_dir: str | None = None, stream=None,
               timeout: float | None = None) -> tuple[int, str]:
        """`ray job submit` and wait; return (exit code, log).  `stream` (a file) receives the log live.  The log is
        the job's own, with the Ray client's chatter reduced to a line at submission and one at the end
        (:func:`quiet_job_line`)."""
        cmd = [_ray_bin(), "job", "submit", "--address", self.dashboard_url, "--log-color", "false"]
        if working_dir:
            cmd += ["--working-dir", working_dir]
        cmd += ["--", *entrypoint]
        proc = subprocess.Popen(cmd, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.time() + timeout if timeout else None
        for raw in proc.stdout:
            line = quiet_job_line(raw)
            if line is None:
                continue
            lines.append(line)
            if stream is not None:
                stream.write(line)
                stream.flush()
            if deadline and time.time() > deadline:
                proc.kill()
                break
        rc = proc.wait()
        return rc, "".join(lines)


class LocalRayHead(RayJobClient):
    """`ray start --head` bound to 127.0.0.1 (see :data:`LOOPBACK_ENV`) with free ports, token authentication and
    a private temp dir; `stop()` stops exactly this cluster's processes (only if we started it), never other Ray
    clusters on the machine."""

    def __init__(self, num_cpus: int | None = None, temp_dir: str | None = None, resources: dict | None = None,
                 loopback: bool = True):
        self.num_cpus = num_cpus
        # loopback=False: Ray binds its servers to every interface, as on Linux by default, so that worker nodes
        # (add_worker) can join; a head bound to loopback accepts no other node
        self.loopback = loopback
        self.resources = resources
        self.workers: list[dict] = []  # worker nodes started by add_worker(): their ports and marks
        self.temp_dir = temp_dir
        self._own_temp_dir = temp_dir is None
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.started = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "LocalRayHead":
        ensure_token()
        if not self.temp_dir:  # private, so stop() can tell our processes from any other cluster's
            self.temp_dir = tempfile.mkdtemp(prefix="lvdray-", dir="/tmp")  # short: Ray's socket paths must fit
        cmd = [
            _ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", "--disable-usage-stats",
        ]
        cmd += _node_args(self.num_cpus, self.resources)
        if self.temp_dir:
            cmd.append(f"--temp-dir={self.temp_dir}")
        proc = subprocess.run(cmd, env=ray_env(LOOPBACK_ENV if self.loopback else None), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        self.started = True
        self._wait_dashboard()
        return self

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None, timeout: float = 90.0) -> None:
        """Start a second raylet on this machine joining the head (a "worker node"), with its own ports and custom
        `resources`, so placement can really spread over nodes.  stop() stops it with the head."""
        if not self.started:
            raise RuntimeError("start the head before adding worker nodes")
        if self.loopback:
            raise RuntimeError("a head bound to loopback accepts no worker node: use LocalRayHead(loopback=False)")
        before = self._alive_nodes()
        cmd = [_ray_bin(), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", *_node_args(num_cpus, resources)]
        proc = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start (worker node) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        self.workers.append({"num_cpus": num_cpus, "resources": resources or {}})
        deadline = time.time() + timeout
        while self._alive_nodes() <= before:
            if time.time() > deadline:
                raise RuntimeError("the worker node did not join the head")
            time.sleep(0.5)

    def _alive_nodes(self) -> int:
        proc = subprocess.run([_ray_bin(), "list", "nodes", "--address", self.address, "--filter", "state=ALIVE",
                               "--format", "json"], env=ray_env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return 0
        import json

        try:
            return len(json.loads(proc.stdout))
        except ValueError:
            return 0

    def _wait_dashboard(self, timeout: float = 90.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # answering (401 without a token): it is up
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Ray dashboard did not come up at {self.dashboard_url}")

    def stop(self) -> None:
        if self.started:
            stop_cluster_processes([self.temp_dir, f":{self.gcs_port} "])  # cmdlines end in a space here
            self.started = False
            if self._own_temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
