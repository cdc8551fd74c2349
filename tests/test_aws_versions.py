"""Versions on the aws target, against moto: a version is a Lambda version of its deployment's
function, and promote, rollback and canary move the alias the HTTP API invokes."""

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError
from django.urls import reverse
from rest_framework.test import APIClient

from deployments import services, tasks
from deployments.models import Deployment
from deployments.pipeline import stages
from deployments.pipeline.errors import TransientStageError
from deployments.targets import aws
from tests.conftest import SKLEARN_PIN, upload
from tests.test_aws import client_error, cloud, pushed, put_image, ready_on_aws  # noqa: F401  (fixtures)
from tests.test_versions import new_version

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
Status = Deployment.Status
ALIAS = "live"


@pytest.fixture
def root(cloud, pushed):  # noqa: F811
    """An aws deployment ready on moto: its function, alias and HTTP API as provision left them."""
    return ready_on_aws(pushed)


def provisioned(cloud, version: Deployment, tag: str) -> Deployment:  # noqa: F811
    """`version` after its push stage (its image, tagged `tag`, in the deployment's repository) and
    its real provision stage."""
    put_image(cloud["ecr"], version, tag)
    repository = cloud["ecr"].describe_repositories(repositoryNames=[aws.repository_name(version)])["repositories"][0]
    version.update(image_uri=f"{repository['repositoryUri']}:{tag}")
    aws.provision(version)
    return Deployment.objects.get(pk=version.pk)


def mark_ready(version: Deployment, django_capture_on_commit_callbacks) -> Deployment:
    """The pipeline's last write: ready, then (after the commit) promoted if it was asked to be."""
    token = "t" * 32
    claimed = services.deployment_claim(deployment_id=version.pk, token=token)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_mark_ready(deployment=claimed, token=token)
    return Deployment.objects.get(pk=version.pk)


def ready_for_review(cloud, root, iris_rf_bytes, tag: str, django_capture_on_commit_callbacks) -> Deployment:  # noqa: F811
    """A new version of `root`, pushed as `tag`, published and ready, waiting to be promoted."""
    version = provisioned(cloud, new_version(root, iris_rf_bytes, auto_promote=False), tag)
    return mark_ready(version, django_capture_on_commit_callbacks)


def alias(cloud, root) -> dict:  # noqa: F811
    return cloud["lambda"].get_alias(FunctionName=aws.resource_name(root), Name=ALIAS)


def published(cloud, root) -> list[str]:  # noqa: F811
    found = cloud["lambda"].list_versions_by_function(FunctionName=aws.resource_name(root))["Versions"]
    return [v["Version"] for v in found if v["Version"] != "$LATEST"]


def variables_of(cloud, root, number: str) -> dict:  # noqa: F811
    found = cloud["lambda"].get_function(FunctionName=aws.resource_name(root), Qualifier=number)
    return found["Configuration"].get("Environment", {}).get("Variables", {})


def integration_uri(cloud, root) -> str:  # noqa: F811
    [integration] = cloud["apigatewayv2"].get_integrations(ApiId=root.api_id)["Items"]
    return integration["IntegrationUri"]


def deny(monkeypatch, service: str, method: str, permission: str) -> None:
    """AWS answers AccessDenied to every `method` call on `service` clients aws.py makes, as it would
    an IAM policy without `permission`; everything else goes to moto."""
    real = aws.client

    class Denying:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            if name != method:
                return getattr(self.client, name)

            def refused(**kwargs):
                raise client_error("AccessDeniedException", 403, f"no {permission}")

            return refused

    monkeypatch.setattr(aws, "client", lambda name: Denying(real(name)) if name == service else real(name))


def fresh(row: Deployment) -> Deployment:
    return Deployment.objects.get(pk=row.pk)


# ------------------------------------------------------------------ a version is a Lambda version


def test_a_version_for_review_is_a_new_lambda_version_and_the_alias_stays_until_promote(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    assert integration_uri(cloud, root) == f"{root.function_arn}:{ALIAS}"  # never the bare function
    assert alias(cloud, root)["FunctionVersion"] == root.lambda_version == "1"

    v2 = provisioned(cloud, new_version(root, iris_rf_bytes, auto_promote=False), "v2")
    assert v2.lambda_version == "2" and published(cloud, root) == ["1", "2"]
    assert v2.function_arn == f"{root.function_arn}:2" and v2.endpoint_url == ""
    # The function's own code moved to v2's image, but the URL invokes the alias, still on v1.
    latest = cloud["lambda"].get_function(FunctionName=aws.resource_name(root))
    assert latest["Code"]["ImageUri"] == v2.image_uri
    assert alias(cloud, root)["FunctionVersion"] == "1"
    assert not cloud["ecr"].describe_repositories()["repositories"][1:]  # one repository for every version

    v2 = mark_ready(v2, django_capture_on_commit_callbacks)
    assert v2.status == Status.READY and alias(cloud, root)["FunctionVersion"] == "1"
    assert fresh(root).serving_version() == fresh(root)

    services.deployment_version_promote(root=fresh(root), number=2)
    assert alias(cloud, root)["FunctionVersion"] == "2" and fresh(root).serving == v2
    assert "the Lambda alias live serves Lambda version 2" in fresh(root).events.last().message

    services.deployment_version_promote(root=fresh(root), number=1)  # rollback
    assert alias(cloud, root)["FunctionVersion"] == "1" and fresh(root).serving == fresh(root)
    assert integration_uri(cloud, root) == f"{root.function_arn}:{ALIAS}"  # the URL never moved
    assert published(cloud, root) == ["1", "2"]  # nothing published again: the keys did not change


def test_a_versions_image_is_pushed_to_its_deployments_repository_under_its_own_tag(
    cloud,
    root,
    iris_rf_bytes,
    monkeypatch,  # noqa: F811
):
    from deployments.targets import aws_image

    v2 = new_version(root, iris_rf_bytes)
    stages.package(v2)
    pushed_to = []
    monkeypatch.setattr(aws_image, "docker_client", lambda: None)  # no Docker: push_image is the stand-in
    monkeypatch.setattr(
        aws_image,
        "push_image",
        lambda client, source, repository, tag, auth: pushed_to.append((repository, tag)) or "sha256:" + "2" * 64,
    )
    aws.push(v2)
    [repository] = cloud["ecr"].describe_repositories()["repositories"]  # no repository of its own
    assert pushed_to == [(repository["repositoryUri"], aws_image.image_tag(v2))]
    assert v2.image_uri == f"{repository['repositoryUri']}@sha256:{'2' * 64}" != root.image_uri


def test_an_auto_promoted_version_moves_the_alias_once_ready(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = provisioned(cloud, new_version(root, iris_rf_bytes), "v2")
    assert alias(cloud, root)["FunctionVersion"] == "1"  # provisioned, not yet ready: not served
    mark_ready(v2, django_capture_on_commit_callbacks)
    assert alias(cloud, root)["FunctionVersion"] == "2" and fresh(root).serving_id == v2.pk


def test_a_deployment_made_before_versions_moves_onto_the_alias_before_its_first_version_changes_the_function(
    cloud,
    root,
    iris_rf_bytes,  # noqa: F811
):
    # As provision left deployments before versions reached aws: the API invoked the bare function.
    lam, gateway = cloud["lambda"], cloud["apigatewayv2"]
    lam.delete_alias(FunctionName=aws.resource_name(root), Name=ALIAS)
    [integration] = gateway.get_integrations(ApiId=root.api_id)["Items"]
    gateway.update_integration(
        ApiId=root.api_id, IntegrationId=integration["IntegrationId"], IntegrationUri=root.function_arn
    )
    root.update(lambda_version="")

    v2 = provisioned(cloud, new_version(root, iris_rf_bytes, auto_promote=False), "v2")
    assert integration_uri(cloud, root) == f"{root.function_arn}:{ALIAS}"
    serving = fresh(root).lambda_version
    assert serving and alias(cloud, root)["FunctionVersion"] == serving != v2.lambda_version
    assert len(gateway.get_integrations(ApiId=root.api_id)["Items"]) == 1  # the same one, pointed anew
    assert any("now invokes the Lambda alias live" in e.message for e in fresh(root).events.all())


def test_a_canary_on_aws_is_the_aliass_weighted_routing(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    services.deployment_canary_start(root=fresh(root), number=2, percent=10)
    now = alias(cloud, root)
    assert now["FunctionVersion"] == "1" and now["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.1}
    services.deployment_canary_start(root=fresh(root), number=2, percent=25)
    assert alias(cloud, root)["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.25}
    services.deployment_canary_end(root=fresh(root))
    assert not alias(cloud, root).get("RoutingConfig", {}).get("AdditionalVersionWeights")
    services.deployment_canary_start(root=fresh(root), number=2, percent=10)
    services.deployment_version_promote(root=fresh(root), number=2)  # a promote ends the canary
    now = alias(cloud, root)
    assert now["FunctionVersion"] == "2" and not now.get("RoutingConfig", {}).get("AdditionalVersionWeights")


def test_shadow_on_aws_is_refused_with_what_works_instead(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    with pytest.raises(services.VersionRefused, match="needs the local runtime.*canary.*promote it or roll back"):
        services.deployment_shadow_start(root=fresh(root), number=2)
    assert fresh(root).shadow_id is None


def test_when_aws_refuses_to_move_the_alias_nothing_changes_and_the_message_says_what_still_serves(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,
    monkeypatch,  # noqa: F811
):
    ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    deny(monkeypatch, "lambda", "update_alias", "lambda:UpdateAlias")
    with pytest.raises(services.VersionRefused, match="version 1 keeps serving.*lambda:UpdateAlias.*IAM"):
        services.deployment_version_promote(root=fresh(root), number=2)
    assert fresh(root).serving_id is None and alias(cloud, root)["FunctionVersion"] == "1"
    with pytest.raises(services.VersionRefused, match="its traffic did not change"):
        services.deployment_canary_start(root=fresh(root), number=2, percent=10)
    assert fresh(root).canary_id is None


# ------------------------------------------------------------------ keys: an alias never serves a stale environment


def test_a_promote_after_a_key_change_serves_the_version_published_again_with_the_keys_of_now(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    assert variables_of(cloud, root, v2.lambda_version)["SERVEML_PRIVATE"] == "0"
    key, _ = services.deployment_key_create(deployment=fresh(root), name="ci")  # now private
    aws.update_access(fresh(root))  # what the access task does
    serving = alias(cloud, root)["FunctionVersion"]
    assert serving not in ("1", "2")  # version 1 published again, with the key: the alias serves that
    assert variables_of(cloud, root, serving)["SERVEML_KEY_SHA256"] == key.key_sha256

    services.deployment_version_promote(root=fresh(root), number=2)
    now = alias(cloud, root)["FunctionVersion"]
    assert now == fresh(v2).lambda_version and now not in ("1", "2", serving)
    assert variables_of(cloud, root, now)["SERVEML_PRIVATE"] == "1"
    assert variables_of(cloud, root, now)["SERVEML_KEY_SHA256"] == key.key_sha256

    services.deployment_key_revoke(key=key)
    aws.update_access(fresh(root))
    assert "SERVEML_KEY_SHA256" not in variables_of(cloud, root, alias(cloud, root)["FunctionVersion"])


def test_lambda_versions_published_again_with_new_keys_are_deleted_once_no_version_records_them(
    cloud,
    root,
    iris_rf_bytes,
    settings,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    services.deployment_key_create(deployment=fresh(root), name="ci")
    aws.update_access(fresh(root))  # version 1 published again, with the key: "3"
    services.deployment_version_promote(root=fresh(root), number=2)  # version 2 too: "4"
    assert (fresh(root).lambda_version, fresh(v2).lambda_version) == ("3", "4")
    assert published(cloud, root) == ["1", "2", "3", "4"]  # "1" and "2" are nobody's, but under an hour old

    # (No publish after this: moto, unlike Lambda, numbers a new version len(versions) + 1.)
    settings.SERVEML_LAMBDA_PRUNE_AFTER_S = 0
    services.deployment_version_promote(root=fresh(root), number=1)  # a rollback: "3" carries the key
    assert alias(cloud, root)["FunctionVersion"] == "3"
    assert published(cloud, root) == ["3", "4"]  # each version's own stays: the next promote is instant
    assert "deleted the superseded Lambda version(s) 1, 2" in fresh(root).events.last().message
    services.deployment_version_promote(root=fresh(root), number=2)
    assert alias(cloud, root)["FunctionVersion"] == "4" and published(cloud, root) == ["3", "4"]
    assert fresh(v2).function_arn.endswith(":4")  # a version's ARN names the Lambda version it has now


def test_a_move_that_read_a_lambda_version_a_key_change_just_replaced_reads_the_rows_again(
    cloud,
    root,
    iris_rf_bytes,
    settings,
    monkeypatch,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    """Ending a canary reads what serves ("2"); before it moves the alias, a key change publishes
    that version again and prunes "2". The move finds "2" gone and reads the rows once more."""
    ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    ready_for_review(cloud, root, iris_rf_bytes, "v3", django_capture_on_commit_callbacks)
    services.deployment_version_promote(root=fresh(root), number=2)
    services.deployment_canary_start(root=fresh(root), number=3, percent=10)
    settings.SERVEML_LAMBDA_PRUNE_AFTER_S = 0
    real, fired = aws.ensure_alias, []

    def ensure_alias(lam, gateway, row, number):
        if not fired:  # the access task of a new key, run between the read and the move
            fired.append(number)
            services.deployment_key_create(deployment=fresh(root), name="ci")
            aws.update_access(fresh(root))
        return real(lam, gateway, row, number)

    monkeypatch.setattr(aws, "ensure_alias", ensure_alias)
    services.deployment_canary_end(root=fresh(root))
    serving = fresh(root).serving
    assert fired == ["2"] and serving.lambda_version not in ("", "2")
    found = alias(cloud, root)
    assert found["FunctionVersion"] == serving.lambda_version and not found.get("RoutingConfig", {}).get(
        "AdditionalVersionWeights"
    )
    assert "SERVEML_KEY_SHA256" in variables_of(cloud, root, found["FunctionVersion"])


def test_a_lambda_version_younger_than_the_prune_delay_is_kept_and_a_refused_delete_fails_nothing(
    cloud,
    root,
    iris_rf_bytes,
    settings,
    monkeypatch,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    services.deployment_key_create(deployment=fresh(root), name="ci")
    aws.update_access(fresh(root))  # "1" is nobody's now, but just published: its pipeline may record it yet
    assert published(cloud, root) == ["1", "2", fresh(root).lambda_version]

    settings.SERVEML_LAMBDA_PRUNE_AFTER_S = 0
    deny(monkeypatch, "lambda", "delete_function", "lambda:DeleteFunction")
    services.deployment_version_promote(root=fresh(root), number=2)  # the promote itself goes through
    assert alias(cloud, root)["FunctionVersion"] == fresh(root).serving.lambda_version
    said = fresh(root).events.last().message
    assert "superseded Lambda versions kept" in said and "lambda:DeleteFunction" in said and "IAM" in said
    assert "1" in published(cloud, root)


def test_verify_of_a_private_deployments_first_version_calls_an_alias_that_knows_the_one_off_key(
    cloud,
    pushed,
    monkeypatch,  # noqa: F811
):
    owners, _ = services.deployment_key_create(deployment=pushed, name="owner's")
    aws.provision(pushed)  # the pipeline's provision: the deployment is still deploying
    deployment = Deployment.objects.get(pk=pushed.pk)
    deployment.update(
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
        example_response={"prediction": 0, "model_type": "RandomForestClassifier"},
    )
    seen = []

    def post(url, **request):  # the URL invokes the alias: what its Lambda version holds at the call
        seen.append((request["headers"], variables_of(cloud, deployment, alias(cloud, deployment)["FunctionVersion"])))
        return stages.httpx.Response(200, json=deployment.example_response)

    monkeypatch.setattr(stages.httpx, "post", post)
    stages.verify(deployment)
    [(headers, variables)] = seen
    presented = headers["Authorization"].removeprefix("Bearer ")
    assert hashlib.sha256(presented.encode()).hexdigest() in variables["SERVEML_KEY_SHA256"].split(",")
    after = variables_of(cloud, deployment, alias(cloud, deployment)["FunctionVersion"])
    assert after["SERVEML_KEY_SHA256"] == owners.key_sha256  # the one-off key is gone from what serves


# ------------------------------------------------------------------ verify: the version's own Lambda version


class Invoked:
    """The moto Lambda client, except that invoke answers as the ServeML handler would (moto runs
    image functions in Docker) and records what it was sent, with the environment it would run in."""

    def __init__(self, lam, cloud, root):  # noqa: F811
        self.lam, self.cloud, self.root, self.calls = lam, cloud, root, []

    def invoke(self, **kwargs):
        event = json.loads(kwargs["Payload"])
        self.calls.append((kwargs["Qualifier"], event, variables_of(self.cloud, self.root, kwargs["Qualifier"])))
        answer = {"statusCode": 200, "body": json.dumps({"prediction": 0, "model_type": "RandomForestClassifier"})}
        return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(answer).encode())}

    def __getattr__(self, name):
        return getattr(self.lam, name)


@pytest.fixture
def invoked(cloud, root, monkeypatch):  # noqa: F811
    real = aws.client
    lam = Invoked(real("lambda"), cloud, root)
    monkeypatch.setattr(aws, "client", lambda service: lam if service == "lambda" else real(service))
    return lam


def with_example(version: Deployment) -> Deployment:
    version.update(
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
        example_response={"prediction": 0, "model_type": "RandomForestClassifier"},
    )
    return version


def test_verify_invokes_the_versions_own_lambda_version_not_the_url_that_serves_another(
    cloud,
    root,
    iris_rf_bytes,
    invoked,  # noqa: F811
):
    v2 = with_example(provisioned(cloud, new_version(root, iris_rf_bytes), "v2"))
    summary = stages.verify(v2)
    [(qualifier, event, _)] = invoked.calls
    assert qualifier == v2.lambda_version == "2"
    assert event["requestContext"]["http"]["method"] == "POST" and event["rawPath"] == "/"
    assert json.loads(event["body"]) == v2.example_request
    assert "validated prediction 0" in summary


def test_verify_of_a_private_version_uses_a_one_off_key_its_recorded_lambda_version_never_knew(
    cloud,
    root,
    iris_rf_bytes,
    invoked,  # noqa: F811
):
    owners, _ = services.deployment_key_create(deployment=fresh(root), name="owner's")
    aws.update_access(fresh(root))
    v2 = with_example(provisioned(cloud, new_version(root, iris_rf_bytes), "v2"))
    recorded = v2.lambda_version
    summary = stages.verify(v2)
    [(qualifier, event, seen)] = invoked.calls
    presented = event["headers"]["authorization"].removeprefix("Bearer ")
    assert hashlib.sha256(presented.encode()).hexdigest() in seen["SERVEML_KEY_SHA256"].split(",")
    assert qualifier != fresh(v2).lambda_version  # the key's version was only for the call
    after = variables_of(cloud, root, fresh(v2).lambda_version)
    assert after["SERVEML_KEY_SHA256"] == owners.key_sha256 and after["SERVEML_PRIVATE"] == "1"
    assert recorded and list(fresh(root).active_keys()) == [owners]
    assert "one-off key, revoked after the call" in summary


# ------------------------------------------------------------------ stop


def test_stopping_an_aws_deployment_with_versions_removes_its_alias_and_every_lambda_version(
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = mark_ready(provisioned(cloud, new_version(root, iris_rf_bytes), "v2"), django_capture_on_commit_callbacks)
    assert alias(cloud, root)["FunctionVersion"] == "2"
    services.deployment_request_stop(deployment=fresh(root))
    tasks.stop.apply(args=[root.pk]).get()
    assert fresh(root).status == Status.STOPPED and fresh(v2).status == Status.STOPPED
    said = fresh(root).events.filter(message__startswith="stopped:").get().message
    assert "Lambda alias live" in said and "with its 2 published version(s)" in said
    for lookup in (
        lambda: alias(cloud, root),
        lambda: cloud["lambda"].get_function(FunctionName=aws.resource_name(root), Qualifier="2"),
        lambda: cloud["lambda"].get_function(FunctionName=aws.resource_name(root)),
    ):
        with pytest.raises(ClientError, match="ResourceNotFoundException"):
            lookup()
    assert cloud["ecr"].describe_repositories()["repositories"] == []
    assert "deleted with the function" in fresh(v2).events.filter(message__startswith="stopped:").get().message


# ------------------------------------------------------------------ the API and the page


@pytest.fixture
def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_api_uploads_promotes_and_rolls_back_an_aws_version_and_refuses_shadow_with_why(
    api,
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    from tests.test_versions import files

    created = api.post(
        f"/api/deployments/{root.public_id}/versions", files(iris_rf_bytes, promote="review"), format="multipart"
    )
    assert created.status_code == 202, created.content
    v2 = mark_ready(
        provisioned(cloud, Deployment.objects.get(public_id=created.json()["id"]), "v2"),
        django_capture_on_commit_callbacks,
    )
    base = f"/api/deployments/{root.public_id}/versions"
    promoted = api.post(f"{base}/2/promote")
    assert promoted.status_code == 200 and promoted.json()["serving"] is True
    assert alias(cloud, root)["FunctionVersion"] == v2.lambda_version
    assert api.post(f"{base}/1/promote").status_code == 200
    assert alias(cloud, root)["FunctionVersion"] == "1"
    canary = api.post(f"{base}/2/canary", {"percent": 20}, format="json")
    assert canary.status_code == 200 and canary.json()["canary_percent"] == 20
    assert alias(cloud, root)["RoutingConfig"]["AdditionalVersionWeights"] == {v2.lambda_version: 0.2}
    shadow = api.post(f"{base}/2/shadow")
    assert shadow.status_code == 409 and "needs the local runtime" in shadow.json()["error"]
    assert "canary" in shadow.json()["error"]


def test_another_users_aws_versions_are_404_and_stay_as_they_were(
    api,
    cloud,
    other_user,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,
    make_deployment,  # noqa: F811
):
    from tests.test_versions import files

    theirs = make_deployment(other_user)
    theirs.target = Deployment.Target.AWS
    repository = aws.ensure_repository(cloud["ecr"], aws.repository_name(theirs))
    theirs.image_uri = f"{repository['repositoryUri']}:v1"
    theirs.save()
    theirs = ready_on_aws(theirs)
    mark_ready(
        provisioned(cloud, new_version(theirs, iris_rf_bytes, auto_promote=False), "v2"),
        django_capture_on_commit_callbacks,
    )
    base = f"/api/deployments/{theirs.public_id}/versions"
    for response in (
        api.get(base),
        api.post(base, files(iris_rf_bytes), format="multipart"),
        api.post(f"{base}/2/promote"),
        api.post(f"{base}/2/canary", {"percent": 10}, format="json"),
        api.post(f"{base}/2/shadow"),
    ):
        assert response.status_code == 404
    assert alias(cloud, theirs)["FunctionVersion"] == "1"
    assert not alias(cloud, theirs).get("RoutingConfig", {}).get("AdditionalVersionWeights")
    assert fresh(theirs).versions.count() == 1


def test_the_page_offers_versions_on_aws_and_an_aws_versions_page_says_it_has_no_url_of_its_own(
    client,
    user,
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    assert 'id="version-form"' in page and "Promote v2" in page and "Lambda version 2" in page
    assert "Shadow comparison needs the local runtime" in page and "Shadow v2" not in page
    version_page = client.get(v2.get_absolute_url()).content.decode()
    assert 'id="lambda-version"' in version_page and root.endpoint_url in version_page
    tried = client.post(reverse("deployment-try", args=[v2.public_id]), {"body": "{}"}).content.decode()
    assert "no URL of its own" in tried
    client.post(reverse("deployment-version-promote", args=[root.public_id, 2]))
    assert alias(cloud, root)["FunctionVersion"] == "2"


# ------------------------------------------------------------------ figures from CloudWatch


def put_lambda_metrics(name: str, data: list[tuple], **dimensions) -> None:
    """Lambda's metrics as CloudWatch holds them, two minutes old (they arrive a minute or two late)."""
    import boto3

    when = datetime.now(UTC) - timedelta(minutes=2)
    boto3.client("cloudwatch", region_name="us-east-1").put_metric_data(
        Namespace="AWS/Lambda",
        MetricData=[
            {
                "MetricName": metric,
                "Dimensions": [{"Name": "FunctionName", "Value": name}]
                + [{"Name": key, "Value": value} for key, value in dimensions.items()],
                "Value": value,
                "Timestamp": when,
            }
            for metric, value in data
        ],
    )


def test_the_page_shows_cloudwatch_figures_for_the_url_and_each_version_read_once_it_has_loaded(
    client,
    user,
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    services.deployment_canary_start(root=fresh(root), number=2, percent=10)
    name = aws.resource_name(root)
    put_lambda_metrics(name, [("Invocations", 40), ("Errors", 2), ("Duration", 12.0), ("Duration", 30.0)])
    # What the alias sent each Lambda version (Lambda's ExecutedVersion dimension).
    put_lambda_metrics(name, [("Invocations", 36), ("Errors", 0)], Resource=f"{name}:live", ExecutedVersion="1")
    put_lambda_metrics(name, [("Invocations", 4), ("Errors", 2)], Resource=f"{name}:live", ExecutedVersion="2")
    put_lambda_metrics("other", [("Invocations", 7)])  # another function's are not this deployment's
    client.force_login(user)
    page = client.get(root.get_absolute_url()).content.decode()
    assert 'data-state="loading"' in page and 'hx-trigger="load"' in page  # read after the page, never polled
    card = client.get(reverse("deployment-figures", args=[root.public_id])).content.decode()
    assert 'data-state="cloudwatch"' in card and "hx-trigger" not in card
    assert 'id="figures-total" data-invocations="40" data-errors="2"' in card
    assert "5.0 %" in card and "21.0 ms" in card and "30.0 ms" in card
    assert 'id="figures-v1" data-invocations="36" data-errors="0"' in card
    assert 'id="figures-v2" data-invocations="4" data-errors="2"' in card and "50.0 %" in card
    assert f'v2 (Lambda version {v2.lambda_version}) <span class="badge canary">canary 10%</span>' in card


def test_when_cloudwatch_does_not_answer_the_page_says_where_the_figures_are(
    client,
    user,
    cloud,
    root,
    monkeypatch,  # noqa: F811
):
    def unreachable(root, versions, **kwargs):
        raise TransientStageError("AWS did not answer while trying to read the function's metrics: timed out")

    monkeypatch.setattr(aws, "figures", unreachable)
    client.force_login(user)
    card = client.get(reverse("deployment-figures", args=[root.public_id])).content.decode()
    assert 'data-state="aws"' in card and "CloudWatch did not answer" in card and "timed out" in card
    assert "Monitoring tab" in card and root.function_arn in card


# ------------------------------------------------------------------ deleting a version


def test_deleting_an_aws_version_deletes_its_lambda_version_in_the_stop_task_and_keeps_the_others(
    cloud,
    root,
    user,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    v3 = ready_for_review(cloud, root, iris_rf_bytes, "v3", django_capture_on_commit_callbacks)
    assert published(cloud, root) == ["1", "2", "3"]
    model_file = v2.model_file.name
    with django_capture_on_commit_callbacks() as queued:
        said = services.deployment_version_delete(version=v2, by_user=user)
    assert "being deleted" in said and fresh(v2).status == Status.STOPPING and len(queued) == 1  # the stop task
    assert published(cloud, root) == ["1", "2", "3"]  # nothing deleted from the request

    tasks.stop.apply(args=[v2.pk]).get()  # what the queued task runs

    v2 = fresh(v2)
    assert v2.status == Status.STOPPED and v2.deleted_at and v2.model_file.name == ""
    assert published(cloud, root) == ["1", "3"]
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        cloud["lambda"].get_function(FunctionName=aws.resource_name(root), Qualifier="2")
    from django.core.files.storage import default_storage

    assert not default_storage.exists(model_file)
    assert "deleted Lambda version 2" in v2.events.last().message
    assert alias(cloud, root)["FunctionVersion"] == "1" and fresh(root).status == Status.READY
    assert fresh(v3).status == Status.READY and fresh(v3).lambda_version == "3"
    # Its image went too; version 3's stays.
    assert "deleted its image (v2…)" in v2.events.last().message
    assert image_tags(cloud, root) == {"v3"}


def image_tags(cloud, root) -> set[str]:  # noqa: F811
    images = cloud["ecr"].describe_images(repositoryName=aws.repository_name(root))["imageDetails"]
    return {tag for image in images for tag in image.get("imageTags", [])}


def test_a_deleted_versions_image_stays_while_another_version_or_latest_uses_it(
    cloud,
    root,
    user,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "same", django_capture_on_commit_callbacks)
    services.deployment_key_create(deployment=fresh(root), name="ci")
    aws.update_access(fresh(root))
    v3 = new_version(root, iris_rf_bytes, auto_promote=False)  # built from the same inputs: push reused the tag
    v3.update(image_uri=fresh(v2).image_uri)
    aws.provision(v3)  # another Lambda version (the keys changed), the same image
    v3 = mark_ready(fresh(v3), django_capture_on_commit_callbacks)
    v4 = ready_for_review(cloud, root, iris_rf_bytes, "v4", django_capture_on_commit_callbacks)  # now $LATEST
    assert len({fresh(v).lambda_version for v in (v2, v3, v4)}) == 3

    def delete(version) -> str:
        with django_capture_on_commit_callbacks():
            services.deployment_version_delete(version=fresh(version), by_user=user)
        tasks.stop.apply(args=[version.pk]).get()
        return fresh(version).events.last().message

    assert "its image kept: the Lambda function's $LATEST names it" in delete(v4)
    assert "its image kept: version 3 uses the same image" in delete(v2)
    assert image_tags(cloud, root) == {"same", "v4"}
    assert "deleted its image (same…)" in delete(v3)
    assert image_tags(cloud, root) == {"v4"}


def test_an_image_aws_refuses_to_delete_is_kept_and_the_version_still_stops(
    cloud,
    root,
    user,
    iris_rf_bytes,
    monkeypatch,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    """An IAM policy from before images were deleted (no ecr:BatchDeleteImage): the stop goes through."""
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    ready_for_review(cloud, root, iris_rf_bytes, "v3", django_capture_on_commit_callbacks)
    deny(monkeypatch, "ecr", "batch_delete_image", "ecr:BatchDeleteImage")
    with django_capture_on_commit_callbacks():
        services.deployment_version_delete(version=fresh(v2), by_user=user)
    tasks.stop.apply(args=[v2.pk]).get()
    said = fresh(v2).events.last().message
    assert fresh(v2).status == Status.STOPPED and "deleted Lambda version 2" in said
    assert "its image kept" in said and "ecr:BatchDeleteImage" in said and "IAM" in said
    assert image_tags(cloud, root) == {"v2", "v3"}


def test_a_lambda_version_the_alias_still_sends_requests_to_is_not_deleted(
    cloud,
    root,
    user,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = ready_for_review(cloud, root, iris_rf_bytes, "v2", django_capture_on_commit_callbacks)
    v3 = ready_for_review(cloud, root, iris_rf_bytes, "v3", django_capture_on_commit_callbacks)
    # The alias moved outside ServeML (or another version holds the same Lambda version): the
    # database says version 1 serves, AWS sends requests to Lambda versions 2 (and 3, a share).
    cloud["lambda"].update_alias(
        FunctionName=aws.resource_name(root),
        Name=ALIAS,
        FunctionVersion="2",
        RoutingConfig={"AdditionalVersionWeights": {"3": 0.1}},
    )
    for version in (v2, v3):
        services.deployment_version_delete(version=version, by_user=user)
        tasks.stop.apply(args=[version.pk]).get()
        assert fresh(version).status == Status.STOPPED and fresh(version).deleted_at
        assert f"Lambda version {version.lambda_version} kept: the alias live still sends requests to it" in (
            fresh(version).events.last().message
        )
    assert published(cloud, root) == ["1", "2", "3"]


def test_the_api_deletes_an_aws_version_with_202_stopping_and_refuses_the_serving_one(
    api,
    cloud,
    root,
    iris_rf_bytes,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    v2 = mark_ready(provisioned(cloud, new_version(root, iris_rf_bytes), "v2"), django_capture_on_commit_callbacks)
    assert fresh(root).serving == v2
    base = f"/api/deployments/{root.public_id}/versions"
    serving = api.delete(f"{base}/2")
    assert serving.status_code == 409 and "serves the deployment's URL" in serving.json()["error"]
    services.deployment_version_promote(root=fresh(root), number=1)
    deleted = api.delete(f"{base}/2")
    assert deleted.status_code == 202 and deleted.json()["status"] == "stopping" and deleted.json()["deleted_at"]
    tasks.stop.apply(args=[v2.pk]).get()
    assert api.get(f"/api/deployments/{v2.public_id}").json()["status"] == "stopped"
    assert published(cloud, root) == ["1"] and alias(cloud, root)["FunctionVersion"] == "1"
