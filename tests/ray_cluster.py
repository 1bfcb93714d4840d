"""Ray clusters for tests that never meet a user's own.

Every Ray test starts its cluster through this module: its own temp dir, free ports for
every port a head or node binds, its own token for Ray's token authentication (kept in
the environment, so nothing is written to ~/.ray), and it stops only the processes it
started: those of the session it was started in (Ray's workers and daemons stay in the
session of the `ray start` that spawned them), found by session id. No `ray stop`, which
stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Variables that would point a Ray command at some other cluster, or at another token.
FOREIGN_RAY_VARS = ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_API_SERVER_ADDRESS",
                    "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_TMPDIR")
# `ray start` flags for the ports every node binds. Left out, Ray picks free ones, except
# the dashboard agent's (52365); 0 makes it pick that one too. The head's fixed defaults
# (GCS 6379, dashboard 8265, client server 10001) get free ports in RayHead.
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port",
                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_temp_dir(prefix: str = "tr-") -> Path:
    """A temp dir under /tmp: Ray puts unix sockets in it, whose paths must stay short."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ray_env(token: str | None, **extra: str) -> dict[str, str]:
    """The environment for Ray commands of one test cluster: token authentication on with
    `token` (None: the variables a user has on a fresh machine, with no Ray settings)."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_RAY_VARS}
    env["PYTHONPATH"] = str(REPO)
    # A node gives up when its raylet has not registered in 30 s, which a busy two-core
    # machine can exceed.
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.update(extra)
    return env


def new_token() -> str:
    return secrets.token_hex(32)


def node_port_flags() -> list[str]:
    """Ports chosen by the OS when bound, not picked here: a port found free now could be
    taken (by any outgoing connection) before Ray binds it."""
    return ["--dashboard-agent-listen-port=0"]


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc): what one `ray start` spawned."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def stop_session(sid: int, grace_s: float = 10.0) -> None:
    """SIGTERM every process of session `sid`, then SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


def run(args: list[str], env: dict[str, str], timeout: float = 180, check: bool = True,
        cwd: Path = REPO) -> str:
    """A Ray or Serve CLI command of the venv; its stdout and stderr."""
    r = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def wait_until(check, what: str, timeout: float) -> str:
    """Poll `check() -> (done, detail)` once a second until done; fail with the detail."""
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        done, detail = check()
        if done:
            return detail
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{detail[-3000:]}")


def gcs_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RayHead:
    """`ray start --head --block` in a session of its own, on free ports, in its own temp
    dir, with token authentication; `stop()` ends that session and nothing else."""

    def __init__(self, num_cpus: int = 1, params: dict[str, str] | None = None) -> None:
        """`params`: more `ray start` flags (name: value), e.g. a chart's rayStartParams;
        they may not set the ports or the temp dir, which are the test's own."""
        self.temp_dir = short_temp_dir()
        self.token = new_token()
        self.env = ray_env(self.token)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        flags = {"num-cpus": str(num_cpus), **(params or {})}
        clash = set(flags) & {*NODE_PORT_FLAGS, "port", "dashboard-port", "ray-client-server-port", "temp-dir"}
        assert not clash, f"RayHead picks these itself: {sorted(clash)}"
        command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                   f"--temp-dir={self.temp_dir}", f"--port={self.gcs_port}",
                   "--include-dashboard=true", f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={free_port()}", *node_port_flags(),
                   *(f"--{k}={v}" for k, v in flags.items())]
        self.nodes: list[subprocess.Popen] = []
        self.process = self._spawn(command, self.temp_dir / "head.log")
        try:
            wait_until(lambda: (gcs_listening(self.gcs_port) and self.dashboard_up(), self.log()),
                       "the Ray head to start", 120)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=REPO, start_new_session=True)

    def dashboard_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.dashboard_port)) == 0

    def log(self) -> str:
        return (self.temp_dir / "head.log").read_text(errors="replace")

    def add_node(self, command: list[str], name: str) -> None:
        """Another node on this machine, e.g. `bash -lc 'ray start --block --address=...'`,
        in a session of its own, stopped with the head."""
        self.nodes.append(self._spawn(command, self.temp_dir / f"{name}.log"))

    def ray(self, *args: str, **kw) -> str:
        return run(list(args), self.env, **kw)

    def alive(self) -> bool:
        return self.process.poll() is None and gcs_listening(self.gcs_port)

    def stop(self) -> None:
        for proc in [*self.nodes, self.process]:
            stop_session(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def __enter__(self) -> RayHead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# One token for every local_ray of this process: Ray's driver loads the token once and
# keeps it, so a second instance with another token would refuse this process.
LOCAL_TOKEN = new_token()


@contextlib.contextmanager
def local_ray(num_cpus: int = 1, **init_kwargs) -> Iterator[None]:
    """`ray.init()` of a new local cluster in this process, as Ray starts one by default
    (token authentication on), with a token from the environment rather than ~/.ray, in
    its own temp dir, without the dashboard; `ray.shutdown()` stops it."""
    import ray

    saved = {k: os.environ.get(k) for k in FOREIGN_RAY_VARS}
    for k in FOREIGN_RAY_VARS:
        os.environ.pop(k, None)
    os.environ["RAY_AUTH_TOKEN"] = LOCAL_TOKEN
    temp_dir = short_temp_dir()
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(temp_dir), **init_kwargs)
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_serve_app(args: dict, num_cpus: int = 1, **init_kwargs) -> Iterator[str]:
    """The app of `args` as "tandem" at / on a `local_ray` of its own, Serve's HTTP proxy on
    a free port; yields its URL at once (the caller waits for what it needs) and shuts
    Serve down after."""
    from ray import serve

    from cluster.app import build_app
    with local_ray(num_cpus=num_cpus, **init_kwargs):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="tandem", route_prefix="/", blocking=False)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
