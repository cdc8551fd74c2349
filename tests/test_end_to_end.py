"""The whole path with real components: API upload -> Redis -> Celery worker -> uv
environment -> sandboxed validation -> runtime model processes -> HTTP predictions."""

import os
import shutil
import signal
import subprocess

import httpx
import numpy as np
import pytest
import threadpoolctl
from rest_framework.authtoken.models import Token

from deployments.allowlist import corpus
from tests.conftest import PANDAS_PIN, SKLEARN_PIN, dump, wait_for
from tests.support.models import model_pids

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

X_IRIS, _ = corpus.iris()
ROWS = X_IRIS[::15]  # ten rows across the three classes


def deploy(live_server, token, model, requirements=SKLEARN_PIN, name="model"):
    response = httpx.post(
        f"{live_server.url}/api/deploy",
        headers={"Authorization": f"Token {token}"},
        files={"model_file": ("model.pkl", dump(model)), "requirements_file": ("requirements.txt", requirements)},
        data={"name": name},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["status_url"].endswith(body["id"])
    return body


def wait_ready(stack, token, body, timeout=300):
    def ready():
        state = httpx.get(body["status_url"], headers={"Authorization": f"Token {token}"}).json()
        assert state["status"] != "failed", state["error"]
        return state if state["status"] == "ready" else None

    return wait_for(ready, timeout, f"deployment {body['id']} ready", stack.worker.log)


@pytest.fixture
def token(user):
    return Token.objects.create(user=user).key


def model_pid(deployment_id: str) -> int:
    return model_pids(deployment_id)[0]


def test_models_deployed_through_the_api_answer_exactly_like_model_predict(stack, live_server, token):
    forest, pipeline, frame_forest = (
        corpus.random_forest(),
        corpus.scaled_logistic_regression(),
        corpus.frame_random_forest(),
    )
    uploads = [
        (forest, deploy(live_server, token, forest, name="forest")),
        (pipeline, deploy(live_server, token, pipeline, name="pipeline")),
        (frame_forest, deploy(live_server, token, frame_forest, requirements=PANDAS_PIN, name="frame")),
    ]
    for model, body in uploads:
        state = wait_ready(stack, token, body)
        url = state["endpoint_url"]
        assert url.startswith(stack.runtime_url)
        stages = [e["stage"] for e in state["events"] if e["duration_ms"] is not None]
        assert stages == ["inspect", "environment", "validate", "package", "provision", "verify"]

        if model is frame_forest:
            frame = corpus.iris_frame()[0].iloc[::15]
            records = frame.to_dict(orient="records")
            answer = httpx.post(url, json={"instances": records}).json()
            assert answer["predictions"] == model.predict(frame).tolist()
            continue
        batch = httpx.post(url, json={"instances": ROWS.tolist()}).json()
        assert batch == {"predictions": model.predict(ROWS).tolist(), "model_type": type(model).__name__}
        single = httpx.post(url, json={"data": ROWS[3].tolist()}).json()
        assert single["prediction"] == model.predict(ROWS[3:4])[0]
        proba = httpx.post(url, json={"instances": ROWS.tolist(), "method": "predict_proba"}).json()
        np.testing.assert_allclose(proba["predictions"], model.predict_proba(ROWS), rtol=1e-9)
        bad = httpx.post(url, json={"data": [1.0, 2.0, 3.0]})
        assert bad.status_code == 400 and bad.json() == {"error": "expected 4 features per row, got 3"}


def environment_summary(state: dict) -> str:
    return next(e["message"] for e in state["events"] if e["stage"] == "environment" and e["duration_ms"] is not None)


def test_the_second_deployment_with_the_same_requirements_installs_nothing(stack, live_server, token):
    from deployments.allowlist import allowed_packages
    from deployments.environments import COMPLETE_MARKER, environment_key, environment_path
    from deployments.models import Deployment
    from deployments.requirements import parse_requirements

    # Environments outlive a test run and SKLEARN_PIN's is built by every other test, so with
    # it both deployments would merely find one: requirements of this test's own, and their
    # environment removed, so that the first must build it and only the second may reuse it.
    requirements = f"{SKLEARN_PIN}threadpoolctl=={threadpoolctl.__version__}\n"
    key = environment_key(parse_requirements(requirements, allowed_packages=allowed_packages()))
    shutil.rmtree(environment_path(key), ignore_errors=True)

    first = wait_ready(stack, token, deploy(live_server, token, corpus.logistic_regression(), requirements))
    assert environment_summary(first).startswith(f"built environment {key[:12]} with uv")
    built = environment_path(key).stat().st_ino  # a rebuild renames a new folder into place
    second = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest(), requirements))
    assert environment_summary(second) == (
        f"reused environment {key[:12]} (same requirements as an earlier deployment: nothing installed)"
    )
    assert {row.environment_key for row in Deployment.objects.filter(public_id__in=[first["id"], second["id"]])} == {
        key
    }
    assert environment_path(key).stat().st_ino == built and (environment_path(key) / COMPLETE_MARKER).exists()


def test_a_crashed_model_process_is_restarted_on_the_next_request(stack, live_server, token):
    model = corpus.random_forest()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    os.kill(model_pid(state["id"]), signal.SIGKILL)
    answer = httpx.post(state["endpoint_url"], json={"instances": ROWS.tolist()}, timeout=60)
    assert answer.status_code == 200
    assert answer.json()["predictions"] == model.predict(ROWS).tolist()


def test_ready_deployments_are_served_again_after_the_runtime_restarts(stack, live_server, token):
    model = corpus.logistic_regression()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    stack.restart_runtime()
    answer = httpx.post(state["endpoint_url"], json={"instances": ROWS.tolist()}, timeout=60)
    assert answer.json()["predictions"] == model.predict(ROWS).tolist()


def test_a_stopped_deployment_answers_404(stack, live_server, token):
    state = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest()))
    assert httpx.post(state["endpoint_url"], json={"data": ROWS[0].tolist()}).status_code == 200
    deleted = httpx.delete(state["status_url"], headers={"Authorization": f"Token {token}"})
    assert deleted.status_code == 200 and deleted.json()["status"] == "stopped"
    gone = httpx.post(state["endpoint_url"], json={"data": ROWS[0].tolist()})
    assert gone.status_code == 404
    assert "stopped" in gone.json()["error"]


def test_a_private_endpoint_answers_only_calls_with_a_live_key(stack, live_server, token):
    state = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest()))
    auth = {"Authorization": f"Token {token}"}
    created = httpx.post(f"{state['status_url']}/keys", headers=auth, json={"name": "batch-job"})
    assert created.status_code == 201
    key = created.json()["key"]
    detail = httpx.get(state["status_url"], headers=auth).json()
    assert detail["is_private"] is True  # private by default once a key exists

    url, row = state["endpoint_url"], {"data": ROWS[0].tolist()}
    refused = httpx.post(url, json=row)
    assert refused.status_code == 401 and "API keys" in refused.json()["error"]
    assert httpx.post(url, json=row, headers={"Authorization": "Bearer sml_wrong"}).status_code == 401
    assert httpx.post(url, json=row, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.post(url, json=row, headers={"X-API-Key": key}).status_code == 200

    from deployments import services
    from deployments.models import DeploymentKey

    services.deployment_key_revoke(key=DeploymentKey.objects.get(name="batch-job"))
    assert httpx.post(url, json=row, headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_concurrent_requests_each_get_their_own_prediction(stack, live_server, token):
    import asyncio

    model = corpus.random_forest()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    rows = corpus.iris()[0]

    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [client.post(state["endpoint_url"], json={"data": row.tolist()}) for row in rows]
            calls.append(client.post(state["endpoint_url"], json={"data": [1.0, 2.0]}))
            return await asyncio.gather(*calls)

    answers = asyncio.run(fire())
    assert [a.json()["prediction"] for a in answers[:-1]] == model.predict(rows).tolist()
    assert answers[-1].status_code == 400
    # A burst never starts more model processes than the pool allows (one per core).
    assert 1 <= len(model_pids(state["id"])) <= (os.cpu_count() or 1)
