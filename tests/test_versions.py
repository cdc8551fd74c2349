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

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
Status = Deployment.Status


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


# ------------------------------------------------------------------ deleting a version


def stored(version: Deployment) -> list[str]:
    """Give `version` a build context in storage and one unpacked on this host, as the package
    stage leaves them; the names of all its files in storage."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from deployments import builds

    artifact = default_storage.save(f"deployments/{version.public_id}/build-context.tar.gz", ContentFile(b"tar"))
    version.update(artifact=artifact)
    unpacked = builds.build_dir(version)
    unpacked.mkdir(parents=True)
    (unpacked / "serveml.json").write_text("{}")
    (unpacked / "serveml.json").chmod(0o444)  # read-only, as sandboxes bind it
    return [version.model_file.name, version.requirements_file.name, artifact]


def exists(names: list[str]) -> list[bool]:
    from django.core.files.storage import default_storage

    return [default_storage.exists(name) for name in names]


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    return settings.DATA_DIR


def test_a_deleted_version_is_unloaded_its_files_are_gone_and_the_others_are_untouched(
    root, user, iris_rf_bytes, runtime, data_dir
):
    v2, v3 = ready(new_version(root, iris_rf_bytes)), ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=3)
    services.deployment_version_promote(root=root, number=1)  # rolled back: nothing routes to 2 or 3
    v2_files, v3_files, root_files = stored(v2), stored(v3), stored(root)
    runtime.clear()

    said = services.deployment_version_delete(version=v2, by_user=user)

    v2.refresh_from_db()
    assert v2.status == Status.STOPPED and v2.deleted_at is not None and v2.stopped_at is not None
    assert runtime == [("unload", str(v2.public_id))]  # its model processes, as a stop does
    assert exists(v2_files) == [False, False, False] and not (data_dir / "builds" / str(v2.public_id)).exists()
    assert (v2.model_file.name, v2.requirements_file.name, v2.artifact) == ("", "", "")
    assert v2.model_filename == "model.pkl"  # what it was, for its page
    assert "stopped serving on the local runtime" in said and "deleted its 3 stored file(s)" in said
    messages = [event.message for event in v2.events.all()]
    assert messages[0].startswith("version 2 queued")  # its event log stays
    assert any(m.startswith("deleted by alice") for m in messages) and messages[-1].startswith("deleted: ")
    assert root.events.last().message.startswith("version 2 deleted: ")
    # The others: untouched, and the URL still answers with the version serving it.
    root.refresh_from_db()
    v3.refresh_from_db()
    assert root.status == v3.status == Status.READY and root.serving_version() == root
    assert exists(v3_files) == exists(root_files) == [True, True, True]
    assert (data_dir / "builds" / str(v3.public_id) / "serveml.json").exists()
    # Deleting it again changes nothing.
    assert services.deployment_version_delete(version=v2, by_user=user) == "it was deleted already"
    assert runtime == [("unload", str(v2.public_id))]


def test_version_1_the_serving_version_the_canary_the_shadowed_one_and_one_deploying_are_not_deleted(
    root, user, iris_rf_bytes, runtime, data_dir
):
    v2, v3, v4 = (ready(new_version(root, iris_rf_bytes)) for _ in range(3))
    deploying = new_version(root, iris_rf_bytes)
    deploying.update(status=Status.DEPLOYING, stage="validate", claim_token="t")
    services.deployment_version_promote(root=root, number=2)
    services.deployment_canary_start(root=root, number=3, percent=10)
    services.deployment_shadow_start(root=root, number=4)
    files = {row.pk: stored(row) for row in (root, v2, v3, v4, deploying)}
    runtime.clear()
    for row, why in [
        (root, r"Version 1 is the deployment itself.*stop it \(Stop deployment on its page, or DELETE /api/"),
        (v2, r"Version 2 serves the deployment's URL: promote \(or roll back to\) another version first"),
        (v3, r"Version 3 is the deployment's canary \(10% of its requests\): end the canary"),
        (v4, r"Version 4 is shadowed .*: stop the shadow first"),
        (deploying, r"Version 5 is still deploying \(the validate stage\): delete it once it is ready or failed"),
    ]:
        with pytest.raises(services.VersionRefused, match=why):
            services.deployment_version_delete(version=row, by_user=user)
    assert runtime == []
    assert all(exists(names) == [True, True, True] for names in files.values())
    assert not Deployment.objects.filter(deleted_at__isnull=False).exists()
    assert {row.version: row.status for row in root.all_versions()} == {
        1: Status.READY,
        2: Status.READY,
        3: Status.READY,
        4: Status.READY,
        5: Status.DEPLOYING,
    }
    # Once nothing routes to it, each one goes.
    services.deployment_canary_end(root=root)
    services.deployment_shadow_end(root=root)
    for row in (v3, v4):
        services.deployment_version_delete(version=row, by_user=user)
    assert set(Deployment.objects.filter(deleted_at__isnull=False).values_list("version", flat=True)) == {3, 4}


def test_a_queued_version_is_deleted_before_its_pipeline_runs_and_a_failed_one_too(
    root, user, iris_rf_bytes, runtime, data_dir
):
    queued, failed = new_version(root, iris_rf_bytes), new_version(root, iris_rf_bytes)
    failed.update(status=Status.FAILED, error="boom")
    names = [queued.model_file.name, failed.model_file.name]
    services.deployment_version_delete(version=queued, by_user=user)
    services.deployment_version_delete(version=failed, by_user=user)
    assert exists(names) == [False, False]
    assert services.deployment_claim(deployment_id=queued.pk, token="late task") is None  # its task runs nothing
    queued.refresh_from_db()
    assert queued.status == Status.STOPPED and "(its pipeline will not run)" in queued.events.all()[1].message


def test_a_stopped_deployments_versions_may_all_be_deleted_but_version_1(root, user, iris_rf_bytes, runtime, data_dir):
    ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=2)
    services.deployment_stop(deployment=root)
    v2 = root.versions.get()
    services.deployment_version_delete(version=v2, by_user=user)  # it served, but the URL serves nothing now
    assert Deployment.objects.get(pk=v2.pk).deleted_at is not None
    with pytest.raises(services.VersionRefused, match="Version 1 is the deployment itself"):
        services.deployment_version_delete(version=root, by_user=user)


def test_the_api_deletes_a_version_with_its_state_and_refuses_with_409s_that_say_why(
    api, root, iris_rf_bytes, runtime, data_dir
):
    v2, v3 = ready(new_version(root, iris_rf_bytes)), ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=3)
    base = f"/api/deployments/{root.public_id}/versions"
    deleted = api.delete(f"{base}/2")
    assert deleted.status_code == 200, deleted.content  # local: stopped at once, as DELETE on a deployment
    body = deleted.json()
    assert body["id"] == str(v2.public_id) and body["status"] == "stopped" and body["deleted_at"]
    assert api.delete(f"{base}/2").status_code == 200  # again: as it is
    serving = api.delete(f"{base}/3")
    assert serving.status_code == 409 and "serves the deployment's URL" in serving.json()["error"]
    first = api.delete(f"{base}/1")
    assert first.status_code == 409 and "stop it" in first.json()["error"]
    missing = api.delete(f"{base}/9")
    assert missing.status_code == 404 and "no version 9" in missing.json()["error"]
    through_a_version = api.delete(f"/api/deployments/{v3.public_id}/versions/1")
    assert through_a_version.status_code == 409 and "through the deployment itself" in through_a_version.json()["error"]
    listed = api.get(base).json()
    assert [(v["version"], v["status"], bool(v["deleted_at"])) for v in listed] == [
        (3, "ready", False),
        (2, "stopped", True),
        (1, "ready", False),
    ]
    assert runtime.count(("unload", str(v2.public_id))) == 1 and ("unload", str(v3.public_id)) not in runtime


def test_another_user_cannot_see_or_delete_a_version(
    api, user, other_user, make_deployment, iris_rf_bytes, runtime, client
):
    theirs = make_deployment(other_user)
    theirs.update(status=Status.READY)
    their_v2 = ready(new_version(theirs, iris_rf_bytes))
    assert api.delete(f"/api/deployments/{theirs.public_id}/versions/2").status_code == 404
    client.force_login(user)
    assert client.post(reverse("deployment-version-delete", args=[theirs.public_id, 2])).status_code == 404
    with pytest.raises(services.VersionRefused, match="Only the deployment's owner"):
        services.deployment_version_delete(version=their_v2, by_user=user)
    their_v2.refresh_from_db()
    assert their_v2.status == Status.READY and their_v2.deleted_at is None and runtime == []


def test_the_page_offers_delete_for_versions_nothing_routes_to_and_deletes_one(
    client, user, root, iris_rf_bytes, runtime, data_dir
):
    ready(new_version(root, iris_rf_bytes)), ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=3)
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    assert "Delete v2" in page
    assert "Delete v3" not in page and "Delete v1" not in page  # it serves; it is the deployment (stop it)
    assert "confirm('Delete version 2?" in page
    response = client.post(reverse("deployment-version-delete", args=[root.public_id, 2]), follow=True)
    page = response.content.decode()
    assert "Version 2 deleted: " in page and "Delete v2" not in page and ">deleted</small>" in page
    refused = client.post(reverse("deployment-version-delete", args=[root.public_id, 3]), follow=True)
    assert "Version 3 serves the deployment&#x27;s URL" in refused.content.decode()


def test_the_admin_deletes_the_selected_versions_and_says_why_not_for_the_others(
    admin_client, root, iris_rf_bytes, runtime, data_dir
):
    v2, v3 = ready(new_version(root, iris_rf_bytes)), ready(new_version(root, iris_rf_bytes))
    services.deployment_version_promote(root=root, number=3)
    page = admin_client.post(
        reverse("admin:deployments_deployment_changelist") + "?versions=all",
        {"action": "delete_versions", "_selected_action": [root.pk, v2.pk, v3.pk]},
        follow=True,
    ).content.decode()
    assert "v2 (" in page and "deleted: stopped serving on the local runtime" in page
    assert "Version 3 serves the deployment" in page and "Version 1 is the deployment itself" in page
    assert [row.version for row in Deployment.objects.filter(deleted_at__isnull=False)] == [2]
    assert Deployment.objects.get(pk=v2.pk).status == Status.STOPPED


def test_the_schema_describes_deleting_a_version(client):
    import json

    schema = json.loads(client.get("/api/schema", HTTP_ACCEPT="application/json").content)
    delete = schema["paths"]["/api/deployments/{public_id}/versions/{number}"]["delete"]
    assert delete["operationId"] == "deployment_version_delete"
    assert set(delete["responses"]) == {"200", "202", "401", "404", "409", "502"}
    assert "deleted_at" in schema["components"]["schemas"]["Version"]["properties"]


def test_a_version_deleted_while_it_was_warmed_for_a_promote_or_a_canary_gets_no_traffic(
    root, user, iris_rf_bytes, runtime, data_dir, monkeypatch
):
    v2 = ready(new_version(root, iris_rf_bytes))

    def deleted_meanwhile(public_id):  # another request deletes it while this one warms it
        services.deployment_version_delete(version=v2, by_user=user)

    monkeypatch.setattr("deployments.runtime.client.load", deleted_meanwhile)
    for start in (
        lambda: services.deployment_version_promote(root=root, number=2),
        lambda: services.deployment_canary_start(root=root, number=2, percent=10),
        lambda: services.deployment_shadow_start(root=root, number=2),
    ):
        v2.update(status=Status.READY, deleted_at=None)  # as it was when that request read it
        with pytest.raises(services.VersionRefused, match="Version 2 was deleted meanwhile: nothing changed"):
            start()
        root.refresh_from_db()
        assert (root.serving_id, root.canary_id, root.shadow_id) == (None, None, None)


def test_a_delete_whose_request_died_is_finished_by_the_reapers_stop_task(
    root, user, iris_rf_bytes, runtime, data_dir, monkeypatch, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from django.utils import timezone

    from deployments import tasks

    v2 = ready(new_version(root, iris_rf_bytes))
    names = stored(v2)
    stop, died = services.deployment_stop, []

    def dies_the_first_time(*, deployment):
        if not died:
            died.append(deployment.pk)
            raise SystemExit("the web process stopped")
        return stop(deployment=deployment)

    monkeypatch.setattr(services, "deployment_stop", dies_the_first_time)
    with pytest.raises(SystemExit):
        services.deployment_version_delete(version=v2, by_user=user)
    v2.refresh_from_db()
    assert v2.status == Status.STOPPING and v2.claim_token and exists(names) == [True, True, True]

    sent = []
    monkeypatch.setattr(services, "_send", lambda pk, task, quiet=False: sent.append((pk, task)))
    Deployment.objects.filter(pk=v2.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_reap()
    assert sent == [(v2.pk, "stop")]
    tasks.stop.apply(args=[v2.pk]).get()
    v2.refresh_from_db()
    assert v2.status == Status.STOPPED and exists(names) == [False, False, False]
    assert v2.events.last().message.startswith("deleted: ")
