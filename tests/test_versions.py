"""Versions of a deployment: numbering, refusals, promote and rollback, the API, the page, the admin.

The services and views here run against the database with the runtime replaced by a
recorder; tests/test_versions_e2e.py proves the switch under load with the real stack."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.test import APIClient

from deployments import services
from deployments.models import Deployment
from tests.conftest import SKLEARN_PIN, upload

pytestmark = pytest.mark.django_db
Status = Deployment.Status


@pytest.fixture(autouse=True)
def no_enqueue(monkeypatch):
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)


@pytest.fixture
def runtime(monkeypatch):
    """What the services ask the runtime, recorded instead of sent."""
    calls = []
    monkeypatch.setattr("deployments.runtime.client.load", lambda public_id: calls.append(("load", str(public_id))))
    monkeypatch.setattr(
        "deployments.runtime.client.route_quietly", lambda public_id: calls.append(("route", str(public_id)))
    )
    monkeypatch.setattr("deployments.runtime.client.unload", lambda public_id: calls.append(("unload", str(public_id))))
    return calls


@pytest.fixture
def root(user, make_deployment):
    deployment = make_deployment(user)
    deployment.update(status=Status.READY, endpoint_url=f"http://runtime/predict/{deployment.public_id}")
    return deployment


def new_version(root, iris_rf_bytes, **kwargs) -> Deployment:
    return services.deployment_version_create(
        root=root,
        model_format="pickle",
        model_upload=upload(iris_rf_bytes),
        requirements_upload=upload(SKLEARN_PIN.encode(), "requirements.txt"),
        **kwargs,
    )


def ready(version: Deployment) -> Deployment:
    version.update(status=Status.READY, endpoint_url=f"http://runtime/predict/{version.public_id}")
    return version


def test_versions_are_numbered_from_two_with_their_own_files_and_the_root_keeps_serving(root, iris_rf_bytes):
    v2, v3 = new_version(root, iris_rf_bytes), new_version(root, iris_rf_bytes)
    assert (v2.version, v3.version) == (2, 3) and v2.version_of == root and v3.version_of == root
    assert v2.status == Status.QUEUED and v2.owner == root.owner and v2.name == root.name
    assert str(v2.public_id) in v2.model_file.name and v2.model_file.name != root.model_file.name
    root.refresh_from_db()
    assert root.serving_version() == root
    assert [v.version for v in root.all_versions()] == [3, 2, 1]
    assert "version 2 queued" in v2.events.first().message


def test_a_stopped_failed_or_deploying_deployment_takes_no_version(root, iris_rf_bytes):
    for status, words in [
        (Status.STOPPED, "was stopped"),
        (Status.FAILED, "first version failed"),
        (Status.DEPLOYING, "still deploying"),
    ]:
        root.update(status=status)
        with pytest.raises(services.VersionRefused, match=words):
            new_version(root, iris_rf_bytes)
    root.update(status=Status.READY)  # on either target: tests/test_aws_versions.py has aws's
    v2 = new_version(root, iris_rf_bytes)
    with pytest.raises(services.VersionRefused, match="to the deployment itself"):
        new_version(v2, iris_rf_bytes)
    assert root.versions.count() == 1


def test_a_ready_version_is_promoted_and_the_runtime_told_after_the_commit(
    root, iris_rf_bytes, runtime, django_capture_on_commit_callbacks
):
    v2 = ready(new_version(root, iris_rf_bytes))
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_version_promote(root=root, number=2)
    root.refresh_from_db()
    assert root.serving == v2 and root.serving_version() == v2
    # warmed before the switch, routed after it
    assert runtime == [("load", str(v2.public_id)), ("route", str(root.public_id))]
    assert "promoted version 2" in root.events.last().message


def test_rollback_to_version_one_and_back(root, iris_rf_bytes, runtime):
    ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=2)
    services.deployment_version_promote(root=root, number=1)
    root.refresh_from_db()
    assert root.serving_version() == root
    assert "rolled back to version 1" in root.events.last().message
    services.deployment_version_promote(root=root, number=2)
    root.refresh_from_db()
    assert root.serving_version().version == 2


def test_only_a_ready_version_of_a_ready_deployment_is_promoted(root, iris_rf_bytes, runtime):
    v2 = new_version(root, iris_rf_bytes)
    with pytest.raises(services.VersionRefused, match="Version 2 is queued"):
        services.deployment_version_promote(root=root, number=2)
    with pytest.raises(services.VersionRefused, match="no version 7"):
        services.deployment_version_promote(root=root, number=7)
    v2.update(status=Status.FAILED)
    with pytest.raises(services.VersionRefused, match="Version 2 is failed"):
        services.deployment_version_promote(root=root, number=2)
    root.refresh_from_db()
    assert root.serving_version() == root and runtime == []


def test_a_version_that_becomes_ready_is_promoted_unless_its_owner_reviews_it(
    root, iris_rf_bytes, runtime, django_capture_on_commit_callbacks
):
    auto = new_version(root, iris_rf_bytes)
    review = new_version(root, iris_rf_bytes, auto_promote=False)
    for version in (review, auto):
        version.update(status=Status.DEPLOYING, claim_token="t", endpoint_url=f"http://r/{version.public_id}")
        with django_capture_on_commit_callbacks(execute=True):
            services.deployment_mark_ready(deployment=version, token="t")
        root.refresh_from_db()
        if version is review:
            assert root.serving_version() == root and "ready for review" in root.events.last().message
    assert root.serving_version() == auto


def test_a_failed_version_never_changes_what_serves(root, iris_rf_bytes, runtime):
    version = new_version(root, iris_rf_bytes)
    version.update(status=Status.DEPLOYING, claim_token="t")
    services.deployment_fail(deployment=version, stage="validate", message="boom", token="t")
    root.refresh_from_db()
    assert root.serving_version() == root and runtime == []


def test_stopping_the_deployment_stops_every_version(root, iris_rf_bytes, runtime, django_capture_on_commit_callbacks):
    v2 = ready(new_version(root, iris_rf_bytes))
    v3 = new_version(root, iris_rf_bytes)
    v3.update(status=Status.FAILED)
    services.deployment_version_promote(root=root, number=2)
    services.deployment_stop(deployment=root)
    assert {row.status for row in Deployment.objects.all()} == {Status.STOPPED}
    assert ("unload", str(v2.public_id)) in runtime and ("unload", str(root.public_id)) in runtime
    # a version whose pipeline ends after its deployment stopped is stopped, not served
    v4 = Deployment.objects.create(
        owner=root.owner, name=root.name, version_of=root, version=4, status=Status.DEPLOYING, claim_token="t"
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_mark_ready(deployment=v4, token="t")
    v4.refresh_from_db()
    assert v4.status == Status.STOPPED


# ------------------------------------------------------------------ the API


@pytest.fixture
def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def files(model_bytes, **extra):
    return {
        "model_file": SimpleUploadedFile("model-v2.pkl", model_bytes),
        "requirements_file": SimpleUploadedFile("requirements.txt", SKLEARN_PIN.encode()),
        **extra,
    }


def test_the_api_uploads_a_version_with_202_and_lists_only_deployments(api, root, iris_rf_bytes):
    response = api.post(f"/api/deployments/{root.public_id}/versions", files(iris_rf_bytes), format="multipart")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["version"] == 2 and body["status"] == "queued" and body["promote"] == "auto"
    assert body["serving"] is False and body["status_url"] == f"http://testserver/api/deployments/{body['id']}"
    review = api.post(
        f"/api/deployments/{root.public_id}/versions", files(iris_rf_bytes, promote="review"), format="multipart"
    ).json()
    assert review["version"] == 3 and review["promote"] == "review"
    assert [d["id"] for d in api.get("/api/deployments").json()] == [str(root.public_id)]
    listed = api.get(f"/api/deployments/{root.public_id}/versions").json()
    assert [(v["version"], v["serving"]) for v in listed] == [(3, False), (2, False), (1, True)]
    # a version's own page of the API: its events
    assert "version 2 queued" in api.get(body["status_url"]).json()["events"][0]["message"]


def test_the_api_refuses_a_version_of_a_stopped_deployment_and_a_bad_upload(api, root, iris_rf_bytes):
    url = f"/api/deployments/{root.public_id}/versions"
    bad = api.post(url, files(b"not a pickle"), format="multipart")
    assert bad.status_code == 400 and "model_file" in bad.json()["fields"]
    bad_promote = api.post(url, files(iris_rf_bytes, promote="later"), format="multipart")
    assert bad_promote.status_code == 400 and "promote" in bad_promote.json()["fields"]
    root.update(status=Status.STOPPED)
    stopped = api.post(url, files(iris_rf_bytes), format="multipart")
    assert stopped.status_code == 409 and "was stopped" in stopped.json()["error"]
    assert not root.versions.exists()


def test_the_api_promotes_and_rolls_back(api, root, iris_rf_bytes, runtime):
    v2 = ready(new_version(root, iris_rf_bytes))
    promoted = api.post(f"/api/deployments/{root.public_id}/versions/2/promote")
    assert promoted.status_code == 200 and promoted.json()["serving"] is True
    assert promoted.json()["id"] == str(v2.public_id)
    back = api.post(f"/api/deployments/{root.public_id}/versions/1/promote")
    assert back.status_code == 200 and back.json()["version"] == 1 and back.json()["serving"] is True
    missing = api.post(f"/api/deployments/{root.public_id}/versions/9/promote")
    assert missing.status_code == 409 and "no version 9" in missing.json()["error"]
    huge = api.post(f"/api/deployments/{root.public_id}/versions/{2**64}/promote")
    assert huge.status_code == 409 and "no version" in huge.json()["error"]
    stop_a_version = api.delete(f"/api/deployments/{v2.public_id}")
    assert stop_a_version.status_code == 409 and "stops with the deployment" in stop_a_version.json()["error"]


def test_another_users_versions_are_404_everywhere(api, other_user, make_deployment, iris_rf_bytes, runtime):
    theirs = make_deployment(other_user)
    theirs.update(status=Status.READY)
    their_v2 = ready(new_version(theirs, iris_rf_bytes))
    for response in (
        api.get(f"/api/deployments/{theirs.public_id}/versions"),
        api.post(f"/api/deployments/{theirs.public_id}/versions", files(iris_rf_bytes), format="multipart"),
        api.post(f"/api/deployments/{theirs.public_id}/versions/2/promote"),
        api.get(f"/api/deployments/{their_v2.public_id}"),
    ):
        assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.serving_version() == theirs and theirs.versions.count() == 1 and runtime == []


# ------------------------------------------------------------------ the page and the admin


def test_the_page_lists_versions_marks_the_serving_one_and_offers_promote_and_rollback(
    client, user, root, iris_rf_bytes, runtime
):
    v2 = ready(new_version(root, iris_rf_bytes))
    new_version(root, iris_rf_bytes).update(status=Status.FAILED)
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    assert 'id="versions"' in page and 'id="version-form"' in page
    for number in (1, 2, 3):
        assert f'id="version-{number}"' in page
    assert "Promote v2" in page and v2.get_absolute_url() in page
    response = client.post(reverse("deployment-version-promote", args=[root.public_id, 2]))
    assert response.status_code == 302
    page = client.get(root.get_absolute_url()).content.decode()
    assert "Roll back to v1" in page
    version_page = client.get(v2.get_absolute_url()).content.decode()
    assert "Version 2 of" in version_page and root.get_absolute_url() in version_page
    assert "Stop deployment" not in version_page
    # the list shows the deployment, not its versions
    listing = client.get(reverse("deployment-list")).content.decode()
    assert listing.count(root.get_absolute_url()) >= 1 and v2.get_absolute_url() not in listing


def test_the_page_uploads_a_version_and_shows_why_one_is_refused(client, user, root, iris_rf_bytes):
    client.force_login(user)
    url = reverse("deployment-version-create", args=[root.public_id])
    response = client.post(url, files(iris_rf_bytes, promote="review"))
    assert response.status_code == 302
    assert root.versions.get().auto_promote is False
    refused = client.post(url, files(b"garbage"))
    assert refused.status_code == 400 and "not a model file" in refused.content.decode()


def test_the_admin_lists_deployments_and_promotes_a_version(admin_client, root, iris_rf_bytes, runtime):
    v2 = ready(new_version(root, iris_rf_bytes))
    changelist = admin_client.get(reverse("admin:deployments_deployment_changelist")).content.decode()
    assert f"/admin/deployments/deployment/{root.pk}/change/" in changelist
    assert f"/admin/deployments/deployment/{v2.pk}/change/" not in changelist
    change = admin_client.get(reverse("admin:deployments_deployment_change", args=[root.pk])).content.decode()
    assert f"/admin/deployments/deployment/{v2.pk}/change/" in change  # the versions inline links each one
    admin_client.post(
        reverse("admin:deployments_deployment_changelist") + "?versions=all",
        {"action": "promote", "_selected_action": [v2.pk]},
    )
    root.refresh_from_db()
    assert root.serving_version() == v2


def test_the_admin_uploads_a_version_for_the_owner(admin_client, root, iris_rf_bytes):
    change = admin_client.get(reverse("admin:deployments_deployment_change", args=[root.pk])).content.decode()
    url = reverse("admin:deployments_deployment_new_version", args=[root.pk])
    assert url in change
    assert 'id="version-form"' in admin_client.get(url).content.decode()
    response = admin_client.post(url, files(iris_rf_bytes, promote="review"))
    assert response.status_code == 302
    version = root.versions.get()
    assert version.version == 2 and version.owner == root.owner and not version.auto_promote
    root.update(status=Status.STOPPED)
    refused = admin_client.post(url, files(iris_rf_bytes), follow=True).content.decode()
    assert "was stopped" in refused and root.versions.count() == 1


def test_the_page_describes_its_url_with_the_version_that_serves_it(client, user, root, iris_rf_bytes, runtime):
    root.update(example_request={"data": [1, 2, 3, 4]}, signature={"model_type": "RandomForestClassifier"})
    v2 = ready(new_version(root, iris_rf_bytes))
    v2.update(example_request={"data": [9, 8]}, signature={"model_type": "LogisticRegression"})
    services.deployment_version_promote(root=root, number=2)
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    curl = page.split('id="curl-example">')[1].split("</pre>")[0]
    assert root.endpoint_url in curl and "[9, 8]" in curl


def test_v2_urls_name_a_version_on_the_runtime_and_only_version_1_elsewhere():
    from deployments.buildkit import serveml_v2

    some = "0b8f6c2e-5f0e-4c0a-9d55-1f0f3f3f3f3f"
    assert serveml_v2.route("POST", f"/v2/models/{some}/versions/2/infer", versions=True) == ("infer", some, 2)
    assert serveml_v2.route("GET", f"/v2/models/{some}", versions=True) == ("metadata", some, None)
    assert serveml_v2.route("GET", "/v2/health/live", versions=True) == ("live", None, None)
    assert serveml_v2.route("GET", f"/v2/models/{some}/versions/1/ready", versions=True) == ("ready", some, 1)
    with pytest.raises(serveml_v2.V2Error, match="no version"):
        serveml_v2.route("POST", f"/v2/models/{some}/versions/{2**40}/infer", versions=True)
    with pytest.raises(serveml_v2.V2Error, match="one version for now"):
        serveml_v2.route("POST", f"/v2/models/{some}/versions/2/infer")  # the aws handler's


def test_a_deployment_with_versions_is_not_redeployed_which_would_take_its_url_down(
    admin_client, root, iris_rf_bytes, runtime
):
    v2 = ready(new_version(root, iris_rf_bytes))
    for row in (root, v2):
        with pytest.raises(services.VersionRefused, match="upload a new version"):
            services.deployment_redeploy(deployment=row)
    page = admin_client.post(
        reverse("admin:deployments_deployment_changelist"),
        {"action": "redeploy", "_selected_action": [root.pk]},
        follow=True,
    ).content.decode()
    assert "upload a new version" in page
    assert {row.status for row in Deployment.objects.all()} == {Status.READY}


def test_the_runtimes_sweep_keeps_the_old_version_when_the_new_one_does_not_load(monkeypatch):
    import asyncio

    from deployments.runtime import app
    from deployments.runtime.process import ModelUnavailable

    runtime = app.Runtime()
    runtime.routes = {"deployment": "v1"}

    async def fails(deployment_id):
        raise ModelUnavailable(502, "the model did not load")

    monkeypatch.setattr(app, "serving", lambda ids: {"deployment": "v2"})
    monkeypatch.setattr(app, "canaries", lambda ids: {})
    monkeypatch.setattr(app, "shadows", lambda ids: {})
    monkeypatch.setattr(runtime, "switch", fails)
    asyncio.run(runtime.reroute())
    assert runtime.routes == {"deployment": "v1"}


def test_two_promotes_from_the_same_view_of_the_deployment_do_not_interleave(root, iris_rf_bytes, runtime):
    ready(new_version(root, iris_rf_bytes)), ready(new_version(root, iris_rf_bytes))
    seen_by_a, seen_by_b = Deployment.objects.get(pk=root.pk), Deployment.objects.get(pk=root.pk)
    services.deployment_version_promote(root=seen_by_a, number=2)
    with pytest.raises(services.VersionRefused, match="changed meanwhile"):
        services.deployment_version_promote(root=seen_by_b, number=3)
    root.refresh_from_db()
    assert root.serving_version().version == 2
