"""Shadow comparison: a candidate version also predicts a sample of the live requests.

The comparison (runtime/shadow.py) runs here against stand-in pools; services, the API and
the page against the database with the runtime replaced by a recorder;
tests/test_shadow_e2e.py runs it on the real stack."""

import asyncio

import orjson
import pytest
from django.urls import reverse

from deployments import services
from deployments.models import Deployment
from deployments.runtime import shadow as shadows
from deployments.runtime.process import ModelUnavailable
from deployments.runtime.shadow import Shadow, agree
from tests.test_versions import api, new_version, ready, root, runtime  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("no_enqueue")

Status = Deployment.Status


class Candidate:
    """A stand-in pool: answers `predictions` (or raises), after `delay` seconds."""

    def __init__(self, answer=lambda body: {"predictions": orjson.loads(body)["instances"]}, delay=0.0):
        self.answer, self.delay, self.calls = answer, delay, 0

    async def predict(self, body):
        self.calls += 1
        await asyncio.sleep(self.delay)
        answer = self.answer(body)
        if isinstance(answer, Exception):
            raise answer
        return 200, orjson.dumps(answer)


def live(values) -> tuple[bytes, bytes]:
    return orjson.dumps({"instances": values}), orjson.dumps({"predictions": values})


def test_classes_agree_when_equal_and_numbers_within_a_relative_millionth():
    assert agree([0, 1, 2], [0, 1, 2]) and not agree([0, 1, 2], [0, 2, 2]) and not agree([0, 1], [0, 1, 2])
    assert agree(["setosa"], ["setosa"]) and not agree(["setosa"], ["virginica"])
    assert agree([100.0], [100.00001]) and not agree([100.0], [100.001])
    assert agree(0.0, 0.0) and not agree(0.0, 1e-12) and not agree(float("nan"), float("nan"))
    assert not agree(True, 1) and agree(None, None) and agree([[0.1, 0.9]], [[0.1, 0.9 + 1e-9]])


def test_one_request_in_ten_is_compared_and_disagreements_keep_five_examples():
    async def scenario():
        flipped = Candidate(lambda body: {"predictions": [v + 1 for v in orjson.loads(body)["instances"]]})
        found = Shadow("v2")
        for i in range(100):
            body, answer = live([i % 2] if i < 50 else [i])
            found.offer(Candidate() if i < 50 else flipped, body, answer)
            await asyncio.sleep(0)
        await asyncio.gather(*found.tasks)
        return found

    found = asyncio.run(scenario())
    report = found.report()
    assert (report["compared"], report["agreed"], report["dropped"], report["in_flight"]) == (10, 5, 0, 0)
    assert len(report["examples"]) == 5
    assert report["examples"][0] == {"input": '{"instances":[50]}', "serving": [50], "candidate": [51]}


def test_a_busy_candidate_drops_sampled_requests_instead_of_queueing_them():
    async def scenario():
        slow = Candidate(delay=0.2)
        found = Shadow("v2", sample_percent=50, max_in_flight=2)
        for i in range(10):
            found.offer(slow, *live([i]))
        assert found.in_flight == 2 and slow.calls <= 2
        await asyncio.gather(*found.tasks)
        return found, slow

    found, slow = asyncio.run(scenario())
    assert (found.compared, found.agreed, found.dropped, slow.calls) == (2, 2, 3, 2)


def test_a_candidate_that_fails_or_is_gone_disagrees_or_is_dropped_and_long_inputs_are_cut():
    async def scenario():
        found = Shadow("v2", sample_percent=100)
        found.offer(Candidate(lambda body: ModelUnavailable(502, "the model process exited")), *live([1] * 200))
        found.offer(None, *live([1]))  # its processes were stopped: nothing to compare with
        await asyncio.gather(*found.tasks)
        return found

    found = asyncio.run(scenario())
    assert (found.compared, found.agreed, found.dropped) == (1, 0, 1)
    example = found.examples[0]
    assert example["candidate"]["status"] == 502 and "exited" in example["candidate"]["error"]
    assert len(example["input"]) == shadows.INPUT_CHARS + 1 and example["input"].endswith("…")


# ------------------------------------------------------------------ services, the API, the page


@pytest.fixture
def v2(root, iris_rf_bytes):  # noqa: F811
    return ready(new_version(root, iris_rf_bytes))


@pytest.mark.django_db
def test_a_shadow_starts_on_a_ready_candidate_ends_and_a_promote_ends_it(
    root,  # noqa: F811
    v2,
    runtime,  # noqa: F811
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_shadow_start(root=root, number=2)
    assert runtime == [("load", str(v2.public_id)), ("route", str(root.public_id))]
    root.refresh_from_db()
    assert root.shadow == v2 and "shadow: version 2" in root.events.last().message
    with pytest.raises(services.VersionRefused, match="serves the requests already"):
        services.deployment_shadow_start(root=root, number=1)
    with pytest.raises(services.VersionRefused, match="not shadowed"):
        services.deployment_shadow_end(root=root, number=1)
    assert services.deployment_shadow_end(root=root) == v2
    root.refresh_from_db()
    assert root.shadow is None
    services.deployment_shadow_start(root=root, number=2)
    services.deployment_canary_start(root=root, number=2, percent=10)
    services.deployment_version_promote(root=Deployment.objects.get(pk=root.pk), number=2)
    root.refresh_from_db()
    assert (root.serving_version(), root.shadow, root.canary) == (v2, None, None)
    assert "(its canary and shadow ended)" in root.events.last().message


@pytest.mark.django_db
def test_the_api_shadows_a_version_and_another_users_is_404(
    api,  # noqa: F811
    root,  # noqa: F811
    v2,
    other_user,
    make_deployment,
    iris_rf_bytes,
    runtime,  # noqa: F811
):
    url = f"/api/deployments/{root.public_id}/versions/2/shadow"
    started = api.post(url)
    assert started.status_code == 200 and started.json()["shadowed"] is True, started.content
    assert api.post(f"/api/deployments/{root.public_id}/versions/9/shadow").status_code == 409
    ended = api.delete(url)
    assert ended.status_code == 200 and ended.json()["shadowed"] is False
    assert api.delete(url).status_code == 409
    theirs = make_deployment(other_user)
    theirs.update(status=Status.READY)
    ready(new_version(theirs, iris_rf_bytes))
    assert api.post(f"/api/deployments/{theirs.public_id}/versions/2/shadow").status_code == 404
    theirs.refresh_from_db()
    assert theirs.shadow is None


@pytest.mark.django_db
def test_the_page_shows_how_often_the_candidate_agreed_with_examples(client, user, root, v2, runtime, monkeypatch):  # noqa: F811
    client.force_login(user)
    form = reverse("deployment-version-shadow", args=[root.public_id, 2])
    assert form in client.get(root.get_absolute_url()).content.decode()
    assert client.post(form).status_code == 302
    report = {
        "compared": 100,
        "agreed": 97,
        "dropped": 0,
        "sample_percent": 10,
        "examples": [{"input": '{"data": [6.3, 2.5, 5.0, 1.9]}', "serving": 2, "candidate": 1}],
    }
    monkeypatch.setattr("deployments.runtime.client.shadow_report", lambda public_id: report)
    page = client.get(root.get_absolute_url()).content.decode()
    assert "agreed on 97 of 100 sampled requests" in page and "6.3, 2.5, 5.0, 1.9" in page and "Stop shadow" in page

    def down(public_id):
        from deployments.runtime.client import RuntimeUnavailable

        raise RuntimeUnavailable("no")

    monkeypatch.setattr("deployments.runtime.client.shadow_report", down)
    assert "Shadow comparison unavailable" in client.get(root.get_absolute_url()).content.decode()
    assert client.post(reverse("deployment-shadow-end", args=[root.public_id])).status_code == 302
    root.refresh_from_db()
    assert root.shadow is None
