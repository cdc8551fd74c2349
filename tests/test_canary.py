"""Canary: a ready version answers a share of a deployment's requests before it is promoted.

Services, the API, the page and the admin run against the database with the runtime
replaced by a recorder; the runtime's split and its routes are tested on a Runtime with
stand-in pools; tests/test_versions_e2e.py measures the split under load on the real stack."""

import asyncio
from types import SimpleNamespace

import pytest
from django.urls import reverse

from deployments import services
from deployments.models import Deployment
from deployments.runtime import app, registry
from deployments.runtime.registry import lookup_canary
from tests.test_versions import api, new_version, ready, root, runtime  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
Status = Deployment.Status


@pytest.fixture
def v2(root, iris_rf_bytes):
    return ready(new_version(root, iris_rf_bytes))


def test_a_canary_starts_on_a_ready_version_after_it_is_warm_and_the_runtime_is_told_after_the_commit(
    root, v2, runtime, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_canary_start(root=root, number=2, percent=20)
    assert runtime == [("load", str(v2.public_id)), ("route", str(root.public_id))]
    root.refresh_from_db()
    assert (root.canary, root.canary_percent, root.serving_version()) == (v2, 20, root)
    assert "canary: version 2 answers 20%" in root.events.last().message
    # a second call changes its share
    services.deployment_canary_start(root=root, number=2, percent=5)
    root.refresh_from_db()
    assert (root.canary, root.canary_percent) == (v2, 5)


def test_a_canary_is_refused_outside_1_to_50_percent_on_the_serving_a_missing_or_unready_version(
    root, v2, iris_rf_bytes, runtime
):
    for number, percent, words in [
        (2, 0, "1 to 50 percent"),
        (2, 51, "1 to 50 percent"),
        (1, 10, "serves every request already"),
        (9, 10, "no version 9"),
    ]:
        with pytest.raises(services.VersionRefused, match=words):
            services.deployment_canary_start(root=root, number=number, percent=percent)
    new_version(root, iris_rf_bytes).update(status=Status.FAILED)
    with pytest.raises(services.VersionRefused, match="only a ready version"):
        services.deployment_canary_start(root=root, number=3, percent=10)
    with pytest.raises(services.VersionRefused, match="through the deployment itself"):
        services.deployment_canary_start(root=v2, number=2, percent=10)
    root.update(status=Status.STOPPED)
    with pytest.raises(services.VersionRefused, match="not ready"):
        services.deployment_canary_start(root=root, number=2, percent=10)
    assert runtime == []
    root.refresh_from_db()
    assert root.canary is None


def test_cancel_ends_the_canary_and_promote_of_any_version_ends_it_too(root, v2, iris_rf_bytes, runtime):
    services.deployment_canary_start(root=root, number=2, percent=20)
    with pytest.raises(services.VersionRefused, match="Version 3 is not a canary"):
        services.deployment_canary_end(root=root, number=3)
    assert services.deployment_canary_end(root=root, number=2) == v2
    root.refresh_from_db()
    assert (root.canary, root.canary_percent) == (None, 0) and "canary of version 2 ended" in root.events.last().message
    with pytest.raises(services.VersionRefused, match="No canary"):
        services.deployment_canary_end(root=root)

    services.deployment_canary_start(root=root, number=2, percent=20)
    services.deployment_version_promote(root=Deployment.objects.get(pk=root.pk), number=2)
    root.refresh_from_db()
    assert (root.serving_version(), root.canary, root.canary_percent) == (v2, None, 0)
    assert "(its canary ended)" in root.events.last().message
    # version 1 as the canary of version 2, then a rollback to it
    services.deployment_canary_start(root=root, number=1, percent=50)
    root.refresh_from_db()
    assert root.canary == root
    services.deployment_version_promote(root=root, number=1)
    root.refresh_from_db()
    assert (root.serving_version(), root.canary) == (root, None)


def test_a_canary_started_from_a_stale_view_after_a_promote_is_refused(root, v2, iris_rf_bytes, runtime):
    ready(new_version(root, iris_rf_bytes))
    stale = Deployment.objects.get(pk=root.pk)
    services.deployment_version_promote(root=root, number=3)
    with pytest.raises(services.VersionRefused, match="changed meanwhile"):
        services.deployment_canary_start(root=stale, number=2, percent=10)
    root.refresh_from_db()
    assert root.canary is None


def test_the_registry_names_the_canary_only_while_it_may_be_served(root, v2, runtime, monkeypatch):
    monkeypatch.setattr(registry, "_spec", lambda row, access: (str(row.public_id), access))
    monkeypatch.setattr(registry, "close_old_connections", lambda: None)  # it would end the test's transaction
    assert lookup_canary(str(root.public_id)) is None
    services.deployment_canary_start(root=root, number=2, percent=20)
    found = lookup_canary(str(root.public_id))
    assert found[0] == str(v2.public_id) and found[2] == 20
    assert registry.canaries([str(root.public_id), str(v2.public_id)]) == {str(root.public_id): (str(v2.public_id), 20)}
    assert lookup_canary(str(v2.public_id)) is None  # a version has no canary of its own
    v2.update(status=Status.FAILED)
    assert lookup_canary(str(root.public_id)) is None and registry.canaries([str(root.public_id)]) == {}


# ------------------------------------------------------------------ the API, the page, the admin


def test_the_api_starts_and_ends_a_canary(api, root, v2, runtime):  # noqa: F811
    url = f"/api/deployments/{root.public_id}/versions/2/canary"
    started = api.post(url, {"percent": 10}, format="json")
    assert started.status_code == 200, started.content
    assert started.json()["canary_percent"] == 10 and started.json()["serving"] is False
    listed = api.get(f"/api/deployments/{root.public_id}/versions").json()
    assert [(v["version"], v["canary_percent"]) for v in listed] == [(2, 10), (1, None)]
    for bad in ({"percent": 0}, {"percent": 60}, {"percent": "x"}, {}):
        refused = api.post(url, bad, format="json")
        assert refused.status_code == 400 and "1 to 50" in refused.json()["error"]
    assert api.post(f"/api/deployments/{root.public_id}/versions/1/canary", {"percent": 10}).status_code == 409
    assert api.delete(f"/api/deployments/{root.public_id}/versions/1/canary").status_code == 409
    ended = api.delete(url)
    assert ended.status_code == 200 and ended.json()["canary_percent"] is None
    assert api.delete(url).status_code == 409


def test_another_users_canary_is_404(api, other_user, make_deployment, iris_rf_bytes, runtime):  # noqa: F811
    theirs = make_deployment(other_user)
    theirs.update(status=Status.READY)
    ready(new_version(theirs, iris_rf_bytes))
    url = f"/api/deployments/{theirs.public_id}/versions/2/canary"
    assert api.post(url, {"percent": 10}, format="json").status_code == 404
    services.deployment_canary_start(root=theirs, number=2, percent=10)
    assert api.delete(url).status_code == 404
    theirs.refresh_from_db()
    assert theirs.canary_percent == 10


def test_the_page_starts_shows_and_ends_a_canary(client, user, other_user, root, v2, runtime):
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    form = reverse("deployment-version-canary", args=[root.public_id, 2])
    assert form in page and "Send to v2" in page
    assert client.post(form, {"percent": "20"}).status_code == 302
    page = client.get(root.get_absolute_url()).content.decode()
    assert "canary 20%" in page and "End canary" in page and "Promote v2" in page
    refused = client.post(form, {"percent": "80"}, follow=True).content.decode()
    assert "1 to 50 percent" in refused
    assert client.post(reverse("deployment-canary-end", args=[root.public_id])).status_code == 302
    root.refresh_from_db()
    assert root.canary is None
    client.force_login(other_user)
    assert client.post(form, {"percent": "20"}).status_code == 404


def test_the_admin_starts_and_ends_a_canary(admin_client, root, v2, runtime):
    changelist = reverse("admin:deployments_deployment_changelist")
    admin_client.post(changelist + "?versions=all", {"action": "canary", "_selected_action": [v2.pk]})
    root.refresh_from_db()
    assert (root.canary, root.canary_percent) == (v2, 10)
    assert "(canary v2: 10%)" in admin_client.get(changelist).content.decode()
    admin_client.post(changelist, {"action": "end_canary", "_selected_action": [root.pk]})
    root.refresh_from_db()
    assert root.canary is None


# ------------------------------------------------------------------ the runtime


@pytest.mark.parametrize("percent", [1, 10, 20, 33, 50])
def test_every_hundred_requests_send_exactly_the_percent_to_the_canary_spread_out(percent):
    canary = app.Canary("v2", percent)
    taken = [canary.take() for _ in range(300)]
    assert sum(taken) == 3 * percent and all(sum(taken[i : i + 100]) == percent for i in (0, 100, 200))
    if percent == 20:
        assert taken[:10] == [True, False, False, False, False] * 2


class StandIn:
    def __init__(self, name):
        self.name, self.busy = name, False

    def close(self):
        pass


def test_the_runtime_splits_a_deployments_requests_and_falls_back_when_the_canary_pool_is_gone(monkeypatch):
    runtime = app.Runtime()
    runtime.pools = {"v1": StandIn("v1"), "v2": StandIn("v2")}
    runtime.routes = {"deployment": "v1"}
    runtime.canaries = {"deployment": app.Canary("v2", 20)}
    answered = [asyncio.run(runtime.pool_for("deployment")).name for _ in range(100)]
    assert answered.count("v2") == 20
    assert asyncio.run(runtime.pool_for("v2")).name == "v2"  # a version's own id is never split
    del runtime.pools["v2"]  # unloaded (idle, or no longer servable): the serving version answers all
    assert {asyncio.run(runtime.pool_for("deployment")).name for _ in range(20)} == {"v1"}


def test_the_runtime_follows_a_canary_that_starts_changes_ends_and_is_promoted(monkeypatch):
    runtime = app.Runtime()
    runtime.pools = {"v1": StandIn("v1")}
    runtime.routes = {"deployment": "v1"}
    state = {"serving": "v1", "canary": None}

    async def pool(spec, access):
        return runtime.pools.setdefault(spec.deployment_id, StandIn(spec.deployment_id))

    monkeypatch.setattr(runtime, "_pool", pool)
    monkeypatch.setattr(app, "lookup_shadow", lambda d: None)
    monkeypatch.setattr(app, "lookup", lambda d: (SimpleNamespace(deployment_id=state["serving"]), None))
    monkeypatch.setattr(
        app,
        "lookup_canary",
        lambda d: state["canary"] and (SimpleNamespace(deployment_id=state["canary"][0]), None, state["canary"][1]),
    )
    monkeypatch.setattr(app, "serving", lambda ids: {"deployment": state["serving"]})
    monkeypatch.setattr(app, "canaries", lambda ids: {"deployment": state["canary"]} if state["canary"] else {})
    monkeypatch.setattr(app, "shadows", lambda ids: {})

    async def scenario():
        state["canary"] = ("v2", 20)
        await runtime.reroute()  # the sweep, told nothing
        assert (runtime.canaries["deployment"].version_id, runtime.canaries["deployment"].percent) == ("v2", 20)
        assert "v2" in runtime.pools
        state["canary"] = ("v2", 40)
        await runtime.switch("deployment")
        assert runtime.canaries["deployment"].percent == 40
        state["canary"] = None  # cancelled: v2 is drained
        await runtime.switch("deployment")
        assert "deployment" not in runtime.canaries
        await asyncio.sleep(1.2)
        assert "v2" not in runtime.pools and "v1" in runtime.pools
        state["canary"] = ("v2", 20)
        await runtime.switch("deployment")
        state["serving"], state["canary"] = "v2", None  # promoted: v2 serves, v1 is drained, v2 is not
        await runtime.switch("deployment")
        assert runtime.routes == {"deployment": "v2"} and not runtime.canaries
        await asyncio.sleep(1.2)
        assert list(runtime.pools) == ["v2"]

    asyncio.run(scenario())
