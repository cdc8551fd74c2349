"""Untrusted uploads cannot run code on the ServeML host.

Every hostile file is refused by the static inspection; and where a file got
past it (an operator allowed too much), the sandbox contains it: the canary
file each payload tries to create never appears.
"""

import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from django.urls import reverse

from deployments import services
from deployments.allowlist import reviewed_globals
from deployments.models import AllowedGlobal, Deployment
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError
from tests import payloads
from tests.conftest import SKLEARN_PIN

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
PAYLOAD_NAMES = sorted(payloads.payloads("/nonexistent"))


@pytest.fixture
def canary(tmp_path):
    # A folder only the host's own user may write to: what a payload is after.
    path = tmp_path / "host-only" / "canary"
    path.parent.mkdir(mode=0o755)
    return path


def test_the_corpus_holds_at_least_fifteen_distinct_payloads():
    assert len(PAYLOAD_NAMES) + len(payloads.loading_bombs("/x")) >= 15


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_inspect_refuses_every_hostile_file(user, make_deployment, canary, name):
    deployment = make_deployment(user, model_bytes=payloads.payloads(canary)[name])
    with pytest.raises(StageError) as refused:
        stages.inspect(deployment)
    message = str(refused.value)
    assert "allowlist" in message or "more data after the end of the model" in message
    assert not canary.exists()


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_the_sandbox_contains_a_payload_that_got_past_inspection(user, make_deployment, canary, name):
    """As if an operator had allowed every import of each payload: the sandbox alone must hold."""
    deployment = make_deployment(user, model_bytes=payloads.payloads(canary)[name])
    allowed = [[g.module, g.name] for g in reviewed_globals()] + [list(pair) for pair in payloads.DANGEROUS]
    services.deployment_update(deployment=deployment, allowed_globals=allowed)
    stages.environment(deployment)
    try:
        stages.validate(deployment)
    except StageError:
        pass  # most are no model at all
    assert not canary.exists()
    assert deployment.events.get(message__startswith="sandbox").message.startswith("sandbox: bubblewrap")


@pytest.mark.parametrize("name", sorted(payloads.loading_bombs("/x")))
@override_settings(SERVEML_SANDBOX_WALL_SECONDS=5, SERVEML_SANDBOX_MEMORY_BYTES=768 * 1024**2)
def test_a_model_that_hangs_or_explodes_on_load_fails_its_deployment(user, make_deployment, name):
    deployment = make_deployment(user, model_bytes=payloads.loading_bombs("/x")[name])
    services.deployment_update(deployment=deployment, allowed_globals=[["builtins", "exec"]])
    stages.environment(deployment)
    with pytest.raises(StageError) as failed:
        stages.validate(deployment)
    assert any(word in str(failed.value) for word in ("longer than 5 s", "memory", "MemoryError", "killed"))


def test_an_operator_can_allow_an_import_in_the_admin(user, make_deployment):
    deployment = make_deployment(user, model_bytes=payloads.call("collections", "Counter", "abc"))
    with pytest.raises(StageError, match="collections.Counter"):
        stages.inspect(deployment)
    AllowedGlobal.objects.create(module="collections", name="Counter", note="test")
    assert "all on the allowlist" in stages.inspect(deployment)


def test_the_refusal_points_old_scikit_learn_paths_to_a_version_fix(user, make_deployment):
    deployment = make_deployment(user, model_bytes=payloads.call("sklearn.svm.classes", "SVC"))
    with pytest.raises(StageError, match="old scikit-learn .*sklearn.svm.classes"):
        stages.inspect(deployment)


# ------------------------------------------------------------------ uploads and settings


@pytest.mark.parametrize(
    "client_name",
    [
        "../../../../etc/cron.d/evil",
        "/etc/passwd",
        "model\x00.pkl",
        "x" * 3000 + ".pkl",
        "....//....//x.pkl",
        "C:\\evil.pkl",
    ],
)
def test_the_clients_file_name_never_becomes_a_path(client, user, iris_rf_bytes, client_name):
    client.force_login(user)
    client.raise_request_exception = False
    response = client.post(
        reverse("deployment-new"),
        {
            "model_file": SimpleUploadedFile(client_name, iris_rf_bytes),
            "requirements_file": SimpleUploadedFile(client_name, SKLEARN_PIN.encode()),
        },
    )
    stored = sorted(p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()) if settings.MEDIA_ROOT.exists() else []
    if response.status_code == 400:  # Django refuses some names outright ("..")
        assert Deployment.objects.count() == 0 and stored == []
        return
    deployment = Deployment.objects.get()
    folder = settings.MEDIA_ROOT / "deployments" / str(deployment.public_id)
    assert stored == [folder / "model.pkl", folder / "requirements.txt"]
    assert len(deployment.model_filename) <= 255 and "\x00" not in deployment.model_filename
    assert "/" not in deployment.model_filename


def test_uploaded_files_are_not_served_by_any_url(client, user, make_deployment):
    deployment = make_deployment(user)
    client.force_login(user)
    assert client.get(f"/media/{deployment.model_file.name}").status_code == 404
    assert not str(settings.MEDIA_ROOT).startswith(str(settings.BASE_DIR / "static"))


def test_celery_only_speaks_json():
    assert settings.CELERY_TASK_SERIALIZER == "json"
    assert settings.CELERY_ACCEPT_CONTENT == ["json"]


def manage(*command: str, env: dict) -> str:
    """`manage.py command` in a fresh process with `env`; what it printed, once it has exited 0."""
    done = subprocess.run(
        [sys.executable, "manage.py", *command], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_check_deploy_is_clean_with_production_settings():
    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "k" * 20 + "-production-secret-0123456789-abcdefghij",
        "DJANGO_ALLOWED_HOSTS": "serveml.example.com",
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # a test-only switch (browser tests), never set in production
    assert "System check identified no issues" in manage("check", "--deploy", env=env)


def test_the_runtime_token_is_never_the_secret_key_itself(monkeypatch):
    import importlib

    import serveml.settings

    monkeypatch.delenv("SERVEML_RUNTIME_TOKEN", raising=False)
    monkeypatch.setenv("DJANGO_SECRET_KEY", "a-secret-that-must-not-travel-in-headers")
    fresh = importlib.reload(serveml.settings)
    try:
        assert fresh.SERVEML_RUNTIME_TOKEN and "a-secret" not in fresh.SERVEML_RUNTIME_TOKEN
        monkeypatch.setenv("SERVEML_RUNTIME_TOKEN", "chosen-by-the-operator")
        assert importlib.reload(serveml.settings).SERVEML_RUNTIME_TOKEN == "chosen-by-the-operator"
    finally:
        monkeypatch.undo()
        importlib.reload(serveml.settings)


def test_forms_carry_csrf_protection(client, user):
    client.force_login(user)
    client.handler.enforce_csrf_checks = True
    assert client.post(reverse("deployment-new"), {}).status_code == 403


def test_uploads_the_database_and_the_data_folder_are_private_to_servemls_user(client, user, iris_rf_bytes, tmp_path):
    client.force_login(user)
    client.post(
        reverse("deployment-new"),
        {
            "model_file": SimpleUploadedFile("model.pkl", iris_rf_bytes),
            "requirements_file": SimpleUploadedFile("requirements.txt", SKLEARN_PIN.encode()),
        },
    )
    stored = [p for p in settings.MEDIA_ROOT.rglob("*")]
    assert stored and all((p.stat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600) for p in stored), {
        str(p): oct(p.stat().st_mode & 0o777) for p in stored
    }
    # A fresh ServeML on SQLite: the data folder and the database (password hashes, tokens) are 0700 / 0600.
    env = {**os.environ, "SERVEML_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    manage("migrate", "--noinput", env=env)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "data" / "serveml.sqlite3").stat().st_mode & 0o777 == 0o600


def test_an_operator_can_allow_a_package_in_the_admin(user, make_deployment):
    from deployments.models import AllowedPackage

    deployment = make_deployment(user, requirements=SKLEARN_PIN + "xgboost==2.1.0\n")
    with pytest.raises(StageError, match="xgboost is not on this ServeML's list of reviewed packages"):
        stages.inspect(deployment)
    AllowedPackage.objects.create(name="XGBoost", note="reviewed")
    assert "all on the allowlist" in stages.inspect(deployment)
