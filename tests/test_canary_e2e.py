"""Canary under load, with the real Redis, worker, runtime and database.

Client threads call a deployment's stable URL the whole time while version 2 (uploaded
for review: it does not serve) answers 20% of its requests, then none once the canary
is cancelled, then all once it is promoted. The two versions predict different labels,
so every answer says which version gave it; none may fail."""

import time

import httpx
import pytest
from sklearn.linear_model import LogisticRegression

from deployments.allowlist import corpus
from tests.conftest import wait_for
from tests.test_end_to_end import ROWS, deploy, token, wait_ready  # noqa: F401  (token: a fixture)
from tests.test_versions_e2e import PredictionStream, version_for_review, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def sent_after(stream, moment: float, count: int) -> list:
    """The predictions of the first `count` requests sent after `moment` (waiting for them)."""
    wait_for(lambda: sum(sent > moment for sent, *_ in stream.answers) >= count, 120, f"{count} answers")
    return [predictions for sent, _, _, predictions in stream.answers if sent > moment][:count]


def test_a_canary_answers_its_share_under_load_then_none_when_cancelled_then_all_when_promoted(
    stack, live_server, token
):
    X, y = corpus.iris()
    v1 = corpus.random_forest()
    v2 = LogisticRegression(max_iter=500).fit(X, y + 10)  # labels 10, 11, 12: its answers tell it apart
    v1_says, v2_says = v1.predict(ROWS).tolist(), v2.predict(ROWS).tolist()
    auth = {"Authorization": f"Token {token}"}
    root = wait_ready(stack, token, deploy(live_server, token, v1, name="canaried"))
    api = f"{live_server.url}/api/deployments/{root['id']}"
    version = version_for_review(stack, api, auth, v2)
    canary = f"{api}/versions/2/canary"

    with PredictionStream(root["endpoint_url"], {"instances": ROWS.tolist()}) as stream:
        stream.wait_until(v1_says)
        started = httpx.post(canary, headers=auth, json={"percent": 20}, timeout=120)
        assert started.status_code == 200 and started.json()["canary_percent"] == 20, started.text
        at = time.monotonic()  # the runtime routed before the API answered
        answers = sent_after(stream, at, 300)
        share = sum(p == v2_says for p in answers) / len(answers)
        assert 0.10 <= share <= 0.30, share
        assert all(p in (v1_says, v2_says) for p in answers)

        ended = httpx.delete(canary, headers=auth, timeout=60)
        assert ended.status_code == 200 and ended.json()["canary_percent"] is None, ended.text
        at = time.monotonic()
        assert all(p == v1_says for p in sent_after(stream, at, 100))
        wait_gone(version["id"])  # nothing routes to version 2 any more: its processes stop

        assert httpx.post(canary, headers=auth, json={"percent": 20}, timeout=120).status_code == 200
        sent_after(stream, time.monotonic(), 50)
        promoted = httpx.post(f"{api}/versions/2/promote", headers=auth, timeout=120)
        assert promoted.status_code == 200 and promoted.json()["serving"], promoted.text
        assert promoted.json()["canary_percent"] is None
        at = time.monotonic()
        assert all(p == v2_says for p in sent_after(stream, at, 100))
        wait_gone(root["id"])  # version 1's processes, drained

    outcomes = [answer[2] for answer in stream.answers]
    assert set(outcomes) == {200}, {outcome for outcome in outcomes if outcome != 200}
    print(f"\ncanary under load: {len(outcomes)} answers, all 200; {share:.0%} from the 20% canary")
