"""Real processes for the end-to-end tests and the benchmark: free ports, a service started in a
process group of its own with its output in a log file, Redis, ServeML's worker / runtime / beat,
and `wait_for`, which waits only for "not yet".

Only the standard library, httpx and redis-py: `bench/run.py` imports this without Django.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "test-output" / "logs"

# What a check may raise while the service it polls is starting (or restarting): "not yet".
NOT_YET: tuple[type[BaseException], ...] = (
    OSError,
    httpx.TransportError,
    RedisConnectionError,
    RedisTimeoutError,
)


class NotReady(AssertionError):
    """What was waited for did not happen: the time ran out, or the process it waited on exited."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    check: Callable,
    timeout: float,
    what: str,
    log: Path | None = None,
    *,
    not_yet: tuple[type[BaseException], ...] = NOT_YET,
    on_not_yet: Callable[[BaseException], None] | None = None,
):
    """Call `check` until it returns something truthy, and return that.

    Only "not yet" is tried again: a falsy result, or one of `not_yet` (after `on_not_yet(error)`).
    An AssertionError or any other exception from `check` is raised at once (a deployment that
    failed must not look like a timeout); the timeout's NotReady shows the last error and the end
    of `log`."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = check()
        except not_yet as exc:
            last = exc
            if on_not_yet:
                on_not_yet(exc)
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    because = f" (last error: {type(last).__name__}: {last})" if last else ""
    tail = log.read_bytes()[-3000:].decode(errors="replace") if log and log.exists() else ""
    raise NotReady(f"{what} did not happen within {timeout} s{because}\n{tail}")


class Service:
    """A process started in a session (process group) of its own, its output appended to
    `log_dir/<name>.log`, stopped with its whole group. `env` is added to this process's."""

    def __init__(self, name: str, argv: list, *, env: dict | None = None, cwd: Path = ROOT, log_dir: Path = LOGS):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.argv = [str(arg) for arg in argv]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.offset = 0

    def start(self):
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def output(self) -> str:
        """What this run of the service logged (its log file is kept across runs)."""
        with open(self.log, "rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode(errors="replace")

    def group(self) -> list[int]:
        """The processes left in this run's process group (its children, once it is gone)."""
        if self.proc is None:
            return []
        found = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]

    def wait_answers(self, url: str, timeout: float, *, method: str = "GET", **request) -> None:
        """Wait until `url` answers 200; NotReady at once if the service exits first."""

        def answers():
            if self.proc.poll() is not None:
                raise NotReady(f"{self.name} exited ({self.proc.returncode}) before it answered at {url}")
            return httpx.request(method, url, **request).status_code == 200

        wait_for(answers, timeout, f"{self.name} answering at {url}", self.log)

    def stop(self, grace: float = 20):
        """SIGTERM to the group, SIGKILL to whatever of it is left after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group outlived its leader (a test may have killed the leader alone)
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Redis(Service):
    """A redis-server of its own on a free port, without persistence."""

    def __init__(self, name: str = "redis", port: int | None = None, *, log_dir: Path = LOGS):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            name,
            ["redis-server", "--bind", "127.0.0.1", "--port", self.port, "--save", "", "--appendonly", "no"],
            log_dir=log_dir,
        )

    def start(self):
        import redis as redis_client

        super().start()
        wait_for(lambda: redis_client.from_url(self.url).ping(), 20, "redis-server start", self.log)
        return self


class Stack:
    """ServeML's Celery worker, runtime and (optionally) beat, and how to restart them.

    `env` holds the settings they share (database, broker, data folder, runtime token); the runtime
    gets a free port. `name` keeps a second stack's logs apart."""

    def __init__(
        self,
        env: dict,
        *,
        name: str = "",
        beat: bool = False,
        worker_concurrency: int = 2,
        log_dir: Path = LOGS,
    ):
        self.runtime_port = free_port()
        self.runtime_url = f"http://127.0.0.1:{self.runtime_port}"
        self.env = {
            "DJANGO_SETTINGS_MODULE": "serveml.settings",
            "SERVEML_RUNTIME_PORT": str(self.runtime_port),
            "SERVEML_RUNTIME_URL": self.runtime_url,
            **env,
        }
        prefix = f"{name}-" if name else ""
        celery = [sys.executable, "-m", "celery", "-A", "serveml"]
        self.worker = Service(
            f"{prefix}worker",
            [
                *celery,
                "worker",
                f"--concurrency={worker_concurrency}",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"{name or 'worker'}@%h",
            ],
            env=self.env,
            log_dir=log_dir,
        )
        self.runtime = Service(
            f"{prefix}runtime",
            [sys.executable, "manage.py", "runtime", "--port", self.runtime_port],
            env=self.env,
            log_dir=log_dir,
        )
        self.beat = (
            Service(f"{prefix}beat", [*celery, "beat", "--loglevel=INFO"], env=self.env, log_dir=log_dir)
            if beat
            else None
        )

    def start(self):
        # All at once, then wait for each: their start-ups overlap.
        for service in (self.worker, self.runtime, self.beat):
            if service:
                service.start()
        self.wait_worker()
        self.wait_runtime()
        if self.beat:
            wait_for(lambda: "beat: Starting" in self.beat.output(), 60, "celery beat start", self.beat.log)
        return self

    def start_worker(self):
        self.worker.start()
        self.wait_worker()

    def wait_worker(self):
        wait_for(lambda: "ready." in self.worker.output(), 60, "celery worker start", self.worker.log)

    def start_runtime(self):
        self.runtime.start()
        self.wait_runtime()

    def wait_runtime(self):
        self.runtime.wait_answers(f"{self.runtime_url}/health", 60)

    def restart_runtime(self):
        self.runtime.stop()
        self.start_runtime()

    def stop(self):
        for service in (self.beat, self.runtime, self.worker):
            if service:
                service.stop()
