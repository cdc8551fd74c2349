"""Schema-driven fuzzing: schemathesis generates requests from the OpenAPI documents and
checks every answer against them, with real servers (the live web app; a real runtime
serving a deployed model). Zero 5xx answers and zero schema violations; the number of
examples is bounded so this stays within a minute or two."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rest_framework.authtoken.models import Token

from deployments.allowlist import corpus
from tests.conftest import PANDAS_PIN
from tests.test_end_to_end import deploy, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
# Every check but positive_data_acceptance: a request can fit the schema and still be
# refused for good reasons (random bytes are no model; 1e308 is no feature value a forest
# takes), and those refusals are the documented 400s the other checks hold to their shape.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
]


# The prediction contract converts feature values the way numpy does: true is 1, "2.5" is 2.5,
# null is a missing value that forests take. So a request outside the document's types may
# rightly be answered, and negative_data_rejection does not apply there; schemathesis still
# sends those requests (--mode all), and every answer must be a documented one of the right shape.
PREDICTION_CHECKS = [check for check in CHECKS if check != "negative_data_rejection"]


def schemathesis(
    location: str, *args: str, cwd: Path, config: Path | None = None, examples: int = 40, checks=CHECKS
) -> str:
    """Run schemathesis; fail with its report unless every check passed."""
    argv = [SCHEMATHESIS, "--no-color"]
    if config:
        argv += ["--config-file", str(config)]
    argv += [
        "run",
        location,
        "--checks",
        ",".join(checks),
        "--max-examples",
        str(examples),
        "--workers",
        "1",
        "--seed",
        # Reproducible: a failure fails the same way on the next run. SERVEML_FUZZ_SEED tries others.
        os.environ.get("SERVEML_FUZZ_SEED", "20261127"),
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "too_slow",
        *args,
    ]
    # cwd: where schemathesis keeps its replay files, a test's own folder
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, "NO_COLOR": "1"}
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-12000:]
    assert "passed" in report
    return report


def test_the_rest_api_answers_every_generated_request_as_its_schema_says(stack, live_server, user, tmp_path):
    token = Token.objects.create(user=user).key
    ready = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest(), name="fuzzed"))
    # Fuzz with a real deployment's id too, so that the operations reach their code past the 404.
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\npublic_id = "{ready["id"]}"\n')
    report = schemathesis(
        f"{live_server.url}/api/schema?format=json",
        "--header",
        f"Authorization: Token {token}",
        config=config,
        examples=25,
        cwd=tmp_path,
    )
    paths = httpx.get(f"{live_server.url}/api/schema?format=json").json()["paths"].values()
    operations = sum(len(path) for path in paths)
    assert operations >= 15 and f"Tested: {operations}\n" in report  # every operation of the REST API


@pytest.mark.parametrize("kind", ["numbers", "records"])
def test_a_deployments_prediction_url_answers_every_generated_request_as_its_document_says(
    stack, live_server, user, tmp_path, kind
):
    token = Token.objects.create(user=user).key
    if kind == "numbers":
        body = deploy(live_server, token, corpus.random_forest(), name="forest")
    else:
        body = deploy(live_server, token, corpus.frame_random_forest(), requirements=PANDAS_PIN, name="frame")
    ready = wait_ready(stack, token, body)
    document = httpx.get(
        f"{live_server.url}/api/deployments/{ready['id']}/openapi.json", headers={"Authorization": f"Token {token}"}
    )
    assert document.status_code == 200
    # The runtime serves the same document beside the prediction URL, to whoever may call it.
    beside = httpx.get(f"{ready['endpoint_url']}/openapi.json")
    assert beside.status_code == 200 and beside.json() == document.json()
    schema = tmp_path / "prediction.json"
    schema.write_bytes(beside.content)
    report = schemathesis(str(schema), "--url", stack.runtime_url, examples=60, checks=PREDICTION_CHECKS, cwd=tmp_path)
    assert "Tested: 1" in report
    # still alive and right after all that
    assert httpx.post(ready["endpoint_url"], json=ready["example_request"]).status_code == 200

    key = httpx.post(
        f"{live_server.url}/api/deployments/{ready['id']}/keys", headers={"Authorization": f"Token {token}"}
    ).json()["key"]
    assert httpx.get(f"{ready['endpoint_url']}/openapi.json").status_code == 401
    private = httpx.get(f"{ready['endpoint_url']}/openapi.json", headers={"X-API-Key": key}).json()
    assert private["components"]["securitySchemes"]["apiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    if kind == "numbers":  # private now: with its key every answer is as documented, without it a 401
        schema.write_text(json.dumps(private))
        report = schemathesis(
            str(schema),
            "--url",
            stack.runtime_url,
            "--header",
            f"Authorization: Bearer {key}",
            examples=15,
            checks=PREDICTION_CHECKS,
            cwd=tmp_path,
        )
        assert "Tested: 1" in report
    httpx.delete(f"{live_server.url}/api/deployments/{ready['id']}", headers={"Authorization": f"Token {token}"})
    assert httpx.get(f"{ready['endpoint_url']}/openapi.json", headers={"X-API-Key": key}).status_code == 404


def test_the_fuzzer_would_catch_a_document_the_server_does_not_keep(stack, live_server, user, tmp_path):
    """The check has teeth: a document that names other classes than the model predicts fails."""
    token = Token.objects.create(user=user).key
    ready = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest(), name="lying"))
    document = httpx.get(
        f"{live_server.url}/api/deployments/{ready['id']}/openapi.json", headers={"Authorization": f"Token {token}"}
    ).json()
    document["components"]["schemas"]["Output"] = {"enum": ["setosa", "versicolor", "virginica"]}
    schema = tmp_path / "lying.json"
    schema.write_text(json.dumps(document))
    with pytest.raises(AssertionError, match="Response violates schema"):
        schemathesis(str(schema), "--url", stack.runtime_url, examples=10, checks=PREDICTION_CHECKS, cwd=tmp_path)
