"""The aws target's image, built by a real Docker engine and pushed to a real registry.

The stand-in base image (Debian's python3.11, see docker_engine.py) replaces
public.ecr.aws/lambda/python:3.11, which cannot be pulled here; everything
else is what the pipeline does for AWS.
"""

import json
import subprocess

import docker
import httpx
import pytest

from deployments.allowlist import corpus
from deployments.pipeline import stages
from deployments.targets import aws_image as image
from tests import docker_engine
from tests.conftest import OUTPUT, SKLEARN_PIN, dump, free_port, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


@pytest.fixture(scope="session")
def engine():
    OUTPUT.joinpath("logs").mkdir(parents=True, exist_ok=True)
    proc = docker_engine.ENGINE.start(OUTPUT / "logs" / "dockerd.log")
    base = docker_engine.ensure_base_image(OUTPUT / "logs" / "debootstrap.log")
    yield docker_engine.ENGINE.client(timeout=900), base
    if proc is not None:
        proc.terminate()
        proc.wait(60)


@pytest.fixture
def aws_image_settings(settings, engine):
    _, base = engine
    settings.SERVEML_DOCKER_URL = docker_engine.ENGINE.url
    settings.SERVEML_LAMBDA_BASE_IMAGE = base
    settings.SERVEML_LAMBDA_ARCHITECTURE = "x86_64"
    # The stand-in runs Debian bookworm (glibc 2.36): manylinux_2_28 wheels, as on Amazon Linux 2023.
    settings.SERVEML_LAMBDA_MANYLINUX = "manylinux_2_28"


@pytest.fixture
def built(aws_image_settings, engine, user, make_deployment):
    model = corpus.scaled_logistic_regression()
    deployment = make_deployment(user, model_bytes=dump(model), requirements=SKLEARN_PIN)
    deployment.target = "aws"
    deployment.save()
    for stage in (stages.inspect, stages.environment, stages.validate, stages.package):
        stage(deployment)
    summary = image.build(deployment)
    yield deployment, model, summary
    client, _ = engine
    for tag in client.images.get(image.local_tag(deployment)).tags:
        client.images.remove(tag, force=True)


def v2_event(body: dict) -> dict:
    return {
        "version": "2.0",
        "routeKey": "POST /",
        "rawPath": "/",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/"}},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


def test_the_lambda_image_builds_without_network_and_its_handler_predicts(built, engine):
    deployment, model, summary = built
    client, _ = engine
    assert "built serveml/" in summary and "with no network" in summary
    assert deployment.image_size_bytes > 0
    log = "\n".join(e.message for e in deployment.events.filter(stage="build"))
    assert "dependencies for Lambda x86_64 installed" in log
    assert "Step" in log and "COPY deps/" in log  # the Docker build log, streamed into the event log

    rows = corpus.iris()[0][::25].tolist()
    script = (
        "import json, serveml_handler as handler; "
        f"print(json.dumps(handler.lambda_handler({v2_event({'instances': rows, 'method': 'predict'})!r}, None)))"
    )
    output = client.containers.run(
        image.local_tag(deployment), ["python3", "-c", script], network_disabled=True, remove=True
    )
    answer = json.loads(output.decode().strip().splitlines()[-1])
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"predictions": model.predict(rows).tolist(), "model_type": "Pipeline"}

    # The same image answers the Open Inference Protocol (serveml_v2.py is in it).
    path = f"/v2/models/{deployment.public_id}/infer"
    infer = {
        **v2_event({"inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}]}),
        "rawPath": path,
        "requestContext": {"http": {"method": "POST", "path": path}},
    }
    script = f"import json, serveml_handler as h; print(json.dumps(h.lambda_handler({infer!r}, None)))"
    output = client.containers.run(
        image.local_tag(deployment), ["python3", "-c", script], network_disabled=True, remove=True
    )
    answer = json.loads(output.decode().strip().splitlines()[-1])
    assert answer["statusCode"] == 200, answer["body"]
    [predicted] = json.loads(answer["body"])["outputs"]
    assert predicted["name"] == "predict" and predicted["data"] == model.predict(rows).tolist()

    # Trimmed: no test suites or bytecode caches in the image.
    listing = client.containers.run(
        image.local_tag(deployment),
        ["sh", "-c", "find /var/task -name __pycache__ -o -name tests -o -name '*.pyc' | head -5"],
        network_disabled=True,
        remove=True,
    ).decode()
    assert listing.strip() == ""

    # The same files again: the image is reused, not rebuilt.
    assert image.build(deployment).startswith("reused image")


@pytest.fixture
def registry(tmp_path):
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(OUTPUT / "logs" / "registry.log", "ab"),
    )
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v2/").status_code == 200, 20, "registry start")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_an_image_is_pushed_to_a_registry_and_pulled_back_by_digest(engine, registry):
    client, base = engine
    repository = f"{registry}/serveml/round-trip"
    digest = image.push_image(client, base, repository, "v1", None)
    assert digest.startswith("sha256:")
    client.images.remove(f"{repository}:v1")
    pulled = client.images.pull(f"{repository}@{digest}")
    assert pulled.id == client.images.get(base).id
    client.images.remove(f"{repository}@{digest}")
