"""Versions under load, with the real Redis, worker, runtime and database.

Client threads call a deployment's stable URL the whole time while version 2 is
uploaded, deployed and promoted, then while the deployment is rolled back to version
1. The two versions predict different labels, so every answer says which version
gave it: none may fail or hang, answers move from one version to the other once
and for all at each switch, and the processes of the version left behind stop;
deleting version 2 then unloads it at once, and the URL answers on."""

import time

import httpx
import pytest
from sklearn.linear_model import LogisticRegression

from deployments.allowlist import corpus
from tests.conftest import SKLEARN_PIN, dump, wait_for
from tests.support.load import Stream as PredictionStream
from tests.test_end_to_end import ROWS, deploy, model_pids, token, wait_ready  # noqa: F401  (token: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def wait_gone(deployment_id: str, timeout: float = 30) -> None:
    wait_for(lambda: not model_pids(deployment_id), timeout, f"the model processes of {deployment_id} stopped")


def upload_version(api: str, auth: dict, model, **form) -> dict:
    """Upload `model` as the next version of the deployment at `api` (its REST URL): the version's JSON."""
    uploaded = httpx.post(
        f"{api}/versions",
        headers=auth,
        data=form,
        files={"model_file": ("model.pkl", dump(model)), "requirements_file": ("requirements.txt", SKLEARN_PIN)},
        timeout=30,
    )
    assert uploaded.status_code == 202, uploaded.text
    return uploaded.json()


def version_for_review(stack, api: str, auth: dict, model) -> dict:
    """Upload `model` as a version that does not serve (for review, a canary or a shadow); wait until it is ready."""
    version = upload_version(api, auth, model, promote="review")

    def ready():
        state = httpx.get(version["status_url"], headers=auth).json()
        assert state["status"] != "failed", state["error"]
        return state["status"] == "ready"

    wait_for(ready, 300, f"version {version['version']} ready for review", stack.worker.log)
    return version


def wait_promoted(stack, api: str, auth: dict) -> None:
    """Wait until the newest version of the deployment at `api` is ready and serves (it failing fails the test)."""

    def promoted():
        listed = httpx.get(f"{api}/versions", headers=auth).json()
        assert listed[0]["status"] != "failed", httpx.get(listed[0]["status_url"], headers=auth).json()["error"]
        return listed[0]["serving"]

    wait_for(promoted, 300, "the newest version ready and promoted", stack.worker.log)


def test_promote_and_rollback_under_load_fail_no_request(stack, live_server, token):
    X, y = corpus.iris()
    v1 = corpus.random_forest()
    v2 = LogisticRegression(max_iter=500).fit(X, y + 10)  # labels 10, 11, 12: its answers tell it apart
    v1_says, v2_says = v1.predict(ROWS).tolist(), v2.predict(ROWS).tolist()
    assert not set(v1_says) & set(v2_says)
    auth = {"Authorization": f"Token {token}"}
    root = wait_ready(stack, token, deploy(live_server, token, v1, name="versioned"))
    stable = root["endpoint_url"]
    api = f"{live_server.url}/api/deployments/{root['id']}"

    with PredictionStream(stable, {"instances": ROWS.tolist()}, threads=3, pause=0.01) as stream:
        stream.wait_until(v1_says)
        version = upload_version(api, auth, v2)
        assert version["version"] == 2 and version["serving"] is False
        wait_promoted(stack, api, auth)
        switched = stream.wait_until(v2_says)
        wait_gone(root["id"])  # version 1's processes, drained

        # The Open Inference Protocol names versions: /versions/<n> is that version, serving or not.
        def v2_infer(path: str) -> list:
            tensor = {
                "inputs": [
                    {"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.ravel().tolist()}
                ]
            }
            answer = httpx.post(f"{stack.runtime_url}/v2/models/{root['id']}{path}/infer", json=tensor, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["outputs"][0]["data"]

        assert v2_infer("") == v2_infer("/versions/2") == v2_says
        assert v2_infer("/versions/1") == v1_says
        assert httpx.post(f"{stack.runtime_url}/v2/models/{root['id']}/versions/3/infer", json={}).status_code == 404

        rollback_sent = time.monotonic()
        back = httpx.post(f"{api}/versions/1/promote", headers=auth, timeout=120)
        assert back.status_code == 200 and back.json()["version"] == 1 and back.json()["serving"], back.text
        rolled_back = time.monotonic()  # the runtime switched before the answer came back
        stream.wait_until(v1_says)
        wait_gone(version["id"])
        count = len(stream.answers)
        wait_for(lambda: len(stream.answers) > count + 30, 30, "answers after version 2 stopped")

        # Delete version 2, its processes started again through its own URL: the runtime unloads them
        # at once (not after its idle timeout), its URL answers 404, and the stable URL keeps answering.
        own_url = httpx.get(version["status_url"], headers=auth).json()["endpoint_url"]
        answer = httpx.post(own_url, json={"instances": ROWS.tolist()}, timeout=60)
        assert answer.status_code == 200 and answer.json()["predictions"] == v2_says, answer.text
        assert model_pids(version["id"])
        deleted = httpx.delete(f"{api}/versions/2", headers=auth, timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["status"] == "stopped" and deleted.json()["deleted_at"]
        wait_gone(version["id"], timeout=5)
        assert httpx.post(own_url, json={"instances": ROWS.tolist()}, timeout=60).status_code == 404
        count = len(stream.answers)
        wait_for(lambda: len(stream.answers) > count + 30, 30, "answers after version 2 was deleted")

    outcomes = [answer[2] for answer in stream.answers]
    assert set(outcomes) == {200}, {outcome for outcome in outcomes if outcome != 200}
    assert all(answer[3] in (v1_says, v2_says) for answer in stream.answers)
    # Once version 2 answered, every request sent after that answer got version 2, until the rollback;
    # every request sent after the rollback answered got version 1.
    first_v2 = min(answered for _, answered, _, predictions in stream.answers if predictions == v2_says)
    assert first_v2 <= switched + 30
    assert all(p == v2_says for sent, answered, _, p in stream.answers if first_v2 < sent and answered < rollback_sent)
    assert all(p == v1_says for sent, _, _, p in stream.answers if sent > rolled_back)
    print(f"\nversions under load: {len(outcomes)} answers, all 200, through a promote and a rollback")

    # The page of the deployment lists both, version 1 serving, version 2 deleted.
    listed = httpx.get(f"{api}/versions", headers=auth).json()
    assert [(v["version"], v["status"], v["serving"]) for v in listed] == [(2, "stopped", False), (1, "ready", True)]
