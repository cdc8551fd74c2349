"""Fixtures: users, model files, and the real services the end-to-end tests drive.

The session's `stack` starts a real redis-server, a real Celery worker and the
real runtime as separate processes sharing the test database, and stops them
after the session. Their logs land in test-output/logs/.
"""

import io
import pickle
from pathlib import Path

import joblib
import pytest
import sklearn
from django import db
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from deployments.allowlist import corpus
from serveml.celery import app as celery_app
from tests.support import processes
from tests.support.processes import Redis, free_port  # free_port: for the tests that import it from here

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
SKLEARN_PIN = f"scikit-learn=={sklearn.__version__}\n"
PANDAS_PIN = f"{SKLEARN_PIN}pandas=={__import__('pandas').__version__}\n"


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


def recorded_posts(monkeypatch, module, answer: dict) -> list:
    """`module`'s httpx.post, through httpx.MockTransport: every request it sends is appended to
    the list returned, and answered 200 with `answer`."""
    import httpx

    requests = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=answer)

    def post(url, **kwargs):
        with httpx.Client(transport=httpx.MockTransport(endpoint)) as http:
            return http.post(url, **kwargs)

    monkeypatch.setattr(module.httpx, "post", post)
    return requests


def stand_in_build(build: Path, handler: str, model_file: str = "model.pkl") -> Path:
    """A build folder for a real sandboxed model process without a real model: `handler` as its
    serveml_handler.py, an empty loader, serveml.json and model file, all read-only as the package
    stage leaves them (sandboxes bind them). The model file's path."""
    build.mkdir()
    files = {"serveml_handler.py": handler, "serveml_loader.py": "", "serveml.json": "{}", model_file: ""}
    for name, text in files.items():
        (build / name).write_text(text)
        (build / name).chmod(0o444)
    return build / model_file


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
def no_enqueue(monkeypatch):
    """Deployments created through services stay queued: no Celery task is sent. For the modules
    that drive the pipeline's stages themselves, or need none of it (their pytestmark uses it)."""
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)


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
NOT_YET = (*processes.NOT_YET, db.OperationalError, db.InterfaceError)


def reconnect_after(error: BaseException) -> None:
    if isinstance(error, db.Error) and not connection.in_atomic_block:
        connection.close()  # the next try connects again


def wait_for(check, timeout: float, what: str, log: Path | None = None):
    """`processes.wait_for`, where a database error is "not yet" too (and the next try connects again)."""
    return processes.wait_for(check, timeout, what, log, not_yet=NOT_YET, on_not_yet=reconnect_after)


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


class Stack(processes.Stack):
    """Worker, runtime and (optionally) beat on the test database and data folder.

    `name` keeps a second stack's logs apart; `extra_env` sets its own settings."""

    def __init__(self, broker_url: str, name: str = "", beat: bool = False, extra_env: dict | None = None):
        env = {
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": broker_url,
            "SERVEML_DATA_DIR": str(settings.DATA_DIR),
            "SERVEML_RUNTIME_TOKEN": settings.SERVEML_RUNTIME_TOKEN,
            **(extra_env or {}),
        }
        super().__init__(env, name=name, beat=beat)


@pytest.fixture(scope="session")
def stack(django_db_setup, django_db_blocker, redis_url):
    services = Stack(redis_url).start()
    # This test process publishes to the same broker and calls the same runtime.
    use_broker(redis_url)
    settings.SERVEML_RUNTIME_URL = settings.SERVEML_RUNTIME_INTERNAL_URL = services.runtime_url
    yield services
    services.stop()
