"""Shadow comparison on the real stack: Redis, worker, runtime and database.

Version 2, a one-split tree, tells setosa from the rest and nothing more, so it disagrees with
version 1 exactly on the rows version 1 calls versicolor or virginica as the tree does not.
With shadow on, the stable URL answers every iris row one by one, from version 1 only; the
runtime compares one request in ten with version 2 and the counts and examples match the rows
known to disagree."""

import httpx
import pytest
from django.conf import settings
from sklearn.tree import DecisionTreeClassifier

from deployments.allowlist import corpus
from deployments.runtime import shadow
from tests.conftest import wait_for
from tests.test_end_to_end import deploy, token, wait_ready  # noqa: F401  (token: a fixture)
from tests.test_versions_e2e import version_for_review

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_shadowed_candidate_is_compared_on_a_sample_without_touching_the_live_answers(stack, live_server, token):
    X, y = corpus.iris()
    v1 = corpus.random_forest()
    v2 = DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, y)
    auth = {"Authorization": f"Token {token}"}
    root = wait_ready(stack, token, deploy(live_server, token, v1, name="shadowed"))
    api = f"{live_server.url}/api/deployments/{root['id']}"
    version_for_review(stack, api, auth, v2)
    started = httpx.post(f"{api}/versions/2/shadow", headers=auth, timeout=120)
    assert started.status_code == 200 and started.json()["shadowed"], started.text

    answers = []
    with httpx.Client(timeout=30) as client:
        for row in X.tolist():
            response = client.post(root["endpoint_url"], json={"data": row})
            answers.append((response.status_code, response.json().get("prediction")))
    assert {status for status, _ in answers} == {200}
    assert [prediction for _, prediction in answers] == v1.predict(X).tolist()  # version 1 answered, all of them

    sampled = range(0, len(X), 100 // shadow.SAMPLE_PERCENT)  # request i is copied when i * 10 % 100 < 10
    disagree = [i for i in sampled if v1.predict(X[i : i + 1])[0] != v2.predict(X[i : i + 1])[0]]
    assert disagree, "the two versions must disagree on some sampled rows"
    runtime_auth = {"Authorization": f"Bearer {settings.SERVEML_RUNTIME_TOKEN}"}

    def report():
        found = httpx.get(f"{stack.runtime_url}/_shadow/{root['id']}", headers=runtime_auth)
        assert found.status_code == 200, found.text
        return found.json()

    wait_for(lambda: report()["compared"] == len(sampled), 30, "the sampled requests compared")
    found = report()
    assert found["agreed"] == len(sampled) - len(disagree) and found["dropped"] == 0
    assert len(found["examples"]) == min(len(disagree), shadow.EXAMPLES)
    first = found["examples"][0]
    i = disagree[0]
    assert first["serving"] == int(v1.predict(X[i : i + 1])[0]) and first["candidate"] == int(
        v2.predict(X[i : i + 1])[0]
    )
    assert httpx.get(f"{stack.runtime_url}/_shadow/{root['id']}").status_code == 403  # the runtime token only

    print(f"\nshadow: agreed on {found['agreed']} of {found['compared']} sampled requests")
