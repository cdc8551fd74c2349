"""Fixtures: users, model files, and the real services the end-to-end tests drive.

The session's `stack` starts a real redis-server, a real Celery worker and the
real runtime as separate processes sharing the test database, and stops them
after the session. Their logs land in test-output/logs/.
"""

import io
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import joblib
import pytest
import sklearn
from django import db
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deployments.allowlist import corpus
from serveml.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
SKLEARN_PIN = f"scikit-learn=={sklearn.__version__}\n"
PANDAS_PIN = f"{SKLEARN_PIN}pandas=={__import__('pandas').__version__}\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dump(model, fmt: str = "pickle", compress=0) -> bytes:
    buffer = io.BytesIO()
    if fmt == "joblib":
        joblib.dump(model, buffer, compress=compress)
    elif fmt == "skops":
        import skops.io

        return skops.io.dumps(model)
    else:
        pickle.dump(model, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    return buffer.getvalue()


def upload(content: bytes, name: str = "model.pkl") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


@pytest.fixture(autouse=True)
def private_media(request, settings, tmp_path):
    """Unit tests store uploads in their own folder; end-to-end tests share the processes' one."""
    if request.node.get_closest_marker("e2e"):
        return
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "media"},
        },
    }


@pytest.fixture(scope="session")
def iris_rf():
    return corpus.random_forest()


@pytest.fixture(scope="session")
def iris_rf_bytes(iris_rf) -> bytes:
    return dump(iris_rf)


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="correct-horse-42")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("mallory", password="correct-horse-43")


@pytest.fixture
def make_deployment(iris_rf_bytes):
    """A deployment row with stored files, as the upload form would create it (not enqueued)."""
    from deployments import services

    def make(owner, model_bytes: bytes = iris_rf_bytes, requirements: str = SKLEARN_PIN, fmt="pickle", name="iris"):
        return services.deployment_create(
            owner=owner,
            name=name,
            target="local",
            model_format=fmt,
            model_upload=upload(model_bytes),
            requirements_upload=upload(requirements.encode(), "requirements.txt"),
        )

    return make


# ---------------------------------------------------------------- real services


# What a check may raise while the service it polls is starting (or restarting): "not yet".
NOT_YET = (
    OSError,
    httpx.TransportError,
    RedisConnectionError,
    RedisTimeoutError,
    db.OperationalError,
    db.InterfaceError,
)


def wait_for(check, timeout: float, what: str, log: Path | None = None):
    """Call `check` until it returns something truthy, and return that.

    Only "not yet" is tried again: a falsy result, or one of NOT_YET. An AssertionError
    or any other exception from `check` fails the test at once (a deployment that failed
    must not look like a timeout), and the timeout's message shows the last error."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = check()
        except NOT_YET as exc:
            last = exc
            if isinstance(exc, db.Error) and not connection.in_atomic_block:
                connection.close()  # the next try connects again
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    because = f" (last error: {type(last).__name__}: {last})" if last else ""
    tail = log.read_bytes()[-3000:].decode(errors="replace") if log and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout} s{because}\n{tail}")


class Service:
    def __init__(self, name: str, argv: list[str], env: dict):
        OUTPUT.joinpath("logs").mkdir(parents=True, exist_ok=True)
        self.log = OUTPUT / "logs" / f"{name}.log"
        self.argv, self.env = argv, env
        self.proc = None
        self.offset = 0

    def start(self):
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=ROOT,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
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

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group outlived its leader (a test may have killed the leader alone)
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Redis(Service):
    def __init__(self, name: str = "redis", port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            name,
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            dict(os.environ),
        )

    def start(self):
        import redis as redis_client

        super().start()
        wait_for(lambda: redis_client.from_url(self.url).ping(), 20, "redis-server start", self.log)
        return self


@pytest.fixture(scope="session")
def redis_url():
    redis = Redis().start()
    yield redis.url
    redis.stop()


def use_broker(url: str) -> None:
    """Make this test process (and its live server) publish tasks to `url`."""
    celery_app.conf.broker_url = url
    # Drop the pooled connections to the previous broker; new ones are made on first use.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


class Stack:
    """Worker, runtime and (optionally) beat processes, and how to restart them.

    `name` keeps a second stack's logs apart; `extra_env` sets its own settings."""

    def __init__(self, broker_url: str, name: str = "", beat: bool = False, extra_env: dict | None = None):
        self.runtime_port = free_port()
        self.runtime_url = f"http://127.0.0.1:{self.runtime_port}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "serveml.settings",
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": broker_url,
            "SERVEML_DATA_DIR": str(settings.DATA_DIR),
            "SERVEML_RUNTIME_PORT": str(self.runtime_port),
            "SERVEML_RUNTIME_URL": self.runtime_url,
            "SERVEML_RUNTIME_TOKEN": settings.SERVEML_RUNTIME_TOKEN,
            **(extra_env or {}),
        }
        prefix = f"{name}-" if name else ""
        self.worker = Service(
            f"{prefix}worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "serveml",
                "worker",
                "--concurrency=2",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"{name or 'worker'}@%h",
            ],
            self.env,
        )
        self.runtime = Service(
            f"{prefix}runtime", [sys.executable, "manage.py", "runtime", "--port", str(self.runtime_port)], self.env
        )
        self.beat = (
            Service(
                f"{prefix}beat", [sys.executable, "-m", "celery", "-A", "serveml", "beat", "--loglevel=INFO"], self.env
            )
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
        wait_for(
            lambda: httpx.get(f"{self.runtime_url}/health").status_code == 200, 30, "runtime start", self.runtime.log
        )

    def restart_runtime(self):
        self.runtime.stop()
        self.start_runtime()

    def stop(self):
        for service in (self.beat, self.runtime, self.worker):
            if service:
                service.stop()


@pytest.fixture(scope="session")
def stack(django_db_setup, django_db_blocker, redis_url):
    services = Stack(redis_url).start()
    # This test process publishes to the same broker and calls the same runtime.
    use_broker(redis_url)
    settings.SERVEML_RUNTIME_URL = settings.SERVEML_RUNTIME_INTERNAL_URL = services.runtime_url
    yield services
    services.stop()
