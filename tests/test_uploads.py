"""The upload form refuses bad files with a person's message and stores nothing."""

import pickle

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from django.urls import reverse

from deployments.models import Deployment
from tests import payloads
from tests.conftest import SKLEARN_PIN

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


def stored_files() -> list:
    root = settings.MEDIA_ROOT
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def post(client, model: bytes, requirements: bytes = SKLEARN_PIN.encode(), model_name="model.pkl", **extra):
    return client.post(
        reverse("deployment-new"),
        {
            "model_file": SimpleUploadedFile(model_name, model),
            "requirements_file": SimpleUploadedFile("requirements.txt", requirements),
            **extra,
        },
    )


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    "model, message",
    [
        (b"just some text, named model.pkl\n", "not a model file ServeML can read"),
        (b"", "The model file is empty."),
        ("truncated", "not a complete pickle"),
    ],
)
def test_a_bad_model_file_is_refused_on_the_form_and_nothing_is_stored(signed_in, iris_rf_bytes, model, message):
    before = stored_files()
    if model == "truncated":
        model = payloads.truncated(iris_rf_bytes)
    response = post(signed_in, model)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert Deployment.objects.count() == 0
    assert stored_files() == before


@pytest.mark.parametrize(
    "requirements, message",
    [
        (b"-e git+https://example.com/x.git#egg=x\n", "`-e` is not allowed"),
        (b"--index-url https://evil.example/simple\nscikit-learn==1.5.2\n", "`--index-url` is not allowed"),
        (b"https://evil.example/sklearn.whl\n", "URLs are not allowed"),
        (b"../../wheels/sklearn.whl\n", "paths are not allowed"),
        (b"   \n", "requirements.txt is empty"),
        (b"\xff\xfe bad bytes", "not UTF-8 text"),
    ],
)
def test_bad_requirements_are_refused_on_the_form_and_nothing_is_stored(
    signed_in, iris_rf_bytes, requirements, message
):
    response = post(signed_in, iris_rf_bytes, requirements)
    assert message in response.content.decode()
    assert Deployment.objects.count() == 0
    assert stored_files() == []


@override_settings(SERVEML_MAX_UPLOAD_BYTES=1024)
def test_a_model_over_the_size_limit_is_cut_off_while_streaming(signed_in):
    response = post(signed_in, b"\x80\x04" + b"x" * 5000)
    assert "This file is larger than the 1.0\xa0KB limit" in response.content.decode()
    assert Deployment.objects.count() == 0


def test_the_size_limit_handler_drops_chunks_past_the_limit(rf):
    from deployments.uploads import SizeLimitUploadHandler

    request = rf.post("/")
    handler = SizeLimitUploadHandler(request)
    with override_settings(SERVEML_MAX_UPLOAD_BYTES=10):
        handler.new_file("model_file", "model.pkl", "application/octet-stream", 100)
        assert handler.receive_data_chunk(b"12345", 0) == b"12345"
        from django.core.files.uploadhandler import SkipFile

        with pytest.raises(SkipFile):
            handler.receive_data_chunk(b"678901", 5)
    assert request.oversized_uploads == {"model_file": 10}


def test_a_good_upload_is_stored_under_server_generated_names(signed_in, iris_rf_bytes):
    response = post(signed_in, iris_rf_bytes, model_name="../../../etc/passwd\x00.pkl", name="")
    deployment = Deployment.objects.get()
    assert response.status_code == 302 and response["Location"] == deployment.get_absolute_url()
    assert deployment.model_file.name == f"deployments/{deployment.public_id}/model.pkl"
    assert deployment.requirements_file.name == f"deployments/{deployment.public_id}/requirements.txt"
    assert deployment.model_filename == "passwd.pkl"
    assert deployment.status == "queued"
    for path in stored_files():
        assert path.is_relative_to(settings.MEDIA_ROOT / "deployments" / str(deployment.public_id))
    assert pickle.loads(deployment.model_file.read()).n_estimators == 10


def test_a_joblib_upload_is_recognised(signed_in):
    import io

    import joblib

    from deployments.allowlist import corpus

    buffer = io.BytesIO()
    joblib.dump(corpus.logistic_regression(), buffer, compress=3)
    post(signed_in, buffer.getvalue(), model_name="model.joblib")
    deployment = Deployment.objects.get()
    assert deployment.model_format == "joblib"
    assert deployment.model_file.name.endswith("/model.joblib")


def test_signing_in_is_required_to_upload(client, iris_rf_bytes):
    response = post(client, iris_rf_bytes)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
