"""Uploads and build contexts go through Django storage: S3 (django-storages) when configured."""

import boto3
import pytest
from moto import mock_aws

from deployments.pipeline import stages

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


@pytest.fixture
def s3_storage(settings, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="serveml-test")
        settings.STORAGES = {
            **settings.STORAGES,
            "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {"bucket_name": "serveml-test"}},
        }
        yield boto3.client("s3", region_name="us-east-1")


def test_uploads_and_the_build_context_are_stored_in_s3_when_configured(s3_storage, user, make_deployment):
    deployment = make_deployment(user)
    stages.inspect(deployment)
    stages.package(deployment)
    keys = {obj["Key"] for obj in s3_storage.list_objects_v2(Bucket="serveml-test")["Contents"]}
    prefix = f"deployments/{deployment.public_id}"
    assert keys == {f"{prefix}/model.pkl", f"{prefix}/requirements.txt", f"{prefix}/build-context.tar.gz"}

    import shutil

    shutil.rmtree(stages.build_dir(deployment))
    restored = stages.restore_context(deployment)
    assert {p.name for p in restored.iterdir()} == {
        "serveml_handler.py",
        "serveml_loader.py",
        "serveml_v2.py",
        "serveml.json",
        "Dockerfile",
        "model.pkl",
        "requirements.txt",
    }
    local = stages.local_model_path(deployment)
    assert local.read_bytes() == deployment.model_file.open("rb").read()
