"""The aws target's AWS calls, against moto: ECR, Lambda, API Gateway, and teardown."""

import hashlib
import json

import boto3
import pytest
from botocore.exceptions import ClientError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from moto import mock_aws

from deployments.models import Deployment
from deployments.pipeline.errors import StageError, TransientStageError
from deployments.targets import aws
from deployments.targets import aws_image as image
from tests.conftest import SKLEARN_PIN, recorded_posts

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
REGION = "us-east-1"


@pytest.fixture
def cloud(settings, monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        aws.account_id.cache_clear()
        role = boto3.client("iam", region_name=REGION).create_role(
            RoleName="serveml-lambda",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        settings.SERVEML_AWS_REGION = REGION
        settings.SERVEML_LAMBDA_ROLE_ARN = role
        settings.SERVEML_LAMBDA_MEMORY_MB = 2048
        settings.SERVEML_LAMBDA_TIMEOUT_S = 45
        settings.SERVEML_LAMBDA_ARCHITECTURE = "arm64"
        yield {name: boto3.client(name, region_name=REGION) for name in ("ecr", "lambda", "apigatewayv2")}
        aws.account_id.cache_clear()


@pytest.fixture
def pushed(cloud, user, make_deployment):
    """A deployment whose image is in its ECR repository, as after the push stage."""
    deployment = make_deployment(user)
    deployment.target = Deployment.Target.AWS
    repository = aws.ensure_repository(cloud["ecr"], aws.repository_name(deployment))
    deployment.image_uri = f"{repository['repositoryUri']}:{deployment.model_sha256}"
    deployment.save()
    return deployment


def counts(cloud, deployment) -> dict:
    gateway = cloud["apigatewayv2"]
    apis = [a for a in gateway.get_apis()["Items"] if a["Name"] == aws.resource_name(deployment)]
    result = {"apis": len(apis), "functions": len(cloud["lambda"].list_functions()["Functions"])}
    if apis:
        api_id = apis[0]["ApiId"]
        result |= {
            "integrations": len(gateway.get_integrations(ApiId=api_id)["Items"]),
            "routes": len(gateway.get_routes(ApiId=api_id)["Items"]),
            "stages": len(gateway.get_stages(ApiId=api_id)["Items"]),
        }
    if result["functions"]:
        try:
            policy = json.loads(cloud["lambda"].get_policy(FunctionName=aws.resource_name(deployment))["Policy"])
            result["permissions"] = len(policy["Statement"])
        except ClientError:
            result["permissions"] = 0
    return result


# One of each, but three routes: ServeML JSON at /, the Open Inference Protocol under /v2.
ONE_OF_EACH = {"apis": 1, "functions": 1, "integrations": 1, "routes": 3, "stages": 1, "permissions": 1}


def test_provision_creates_the_function_and_the_http_api_in_front_of_it(cloud, pushed):
    summary = aws.provision(pushed)
    function = cloud["lambda"].get_function(FunctionName=aws.resource_name(pushed))
    config = function["Configuration"]
    assert config["PackageType"] == "Image"
    assert function["Code"]["ImageUri"] == pushed.image_uri
    assert (config["Role"], config["MemorySize"], config["Timeout"]) == (aws.settings.SERVEML_LAMBDA_ROLE_ARN, 2048, 45)
    assert config["Architectures"] == ["arm64"]
    assert config["State"] == "Active"

    gateway = cloud["apigatewayv2"]
    api = gateway.get_api(ApiId=pushed.api_id)
    assert api["ProtocolType"] == "HTTP"
    [integration] = gateway.get_integrations(ApiId=pushed.api_id)["Items"]
    assert integration["IntegrationType"] == "AWS_PROXY" and integration["PayloadFormatVersion"] == "2.0"
    # The API invokes the alias, which serves the function's first published version.
    assert integration["IntegrationUri"] == config["FunctionArn"] + ":live"
    alias = cloud["lambda"].get_alias(FunctionName=aws.resource_name(pushed), Name="live")
    assert alias["FunctionVersion"] == "1" and Deployment.objects.get(pk=pushed.pk).lambda_version == "1"
    routes = gateway.get_routes(ApiId=pushed.api_id)["Items"]
    assert sorted(route["RouteKey"] for route in routes) == ["ANY /v2/{proxy+}", "GET /v2", "POST /"]  # JSON and V2
    assert {route["Target"] for route in routes} == {f"integrations/{integration['IntegrationId']}"}
    [stage] = gateway.get_stages(ApiId=pushed.api_id)["Items"]
    assert stage["StageName"] == "$default" and stage["AutoDeploy"] is True
    policy = cloud["lambda"].get_policy(FunctionName=aws.resource_name(pushed), Qualifier="live")["Policy"]
    [statement] = json.loads(policy)["Statement"]
    assert statement["Principal"]["Service"] == "apigateway.amazonaws.com"
    assert statement["Resource"] == config["FunctionArn"] + ":live"
    assert pushed.api_id in json.dumps(statement["Condition"])
    pushed.refresh_from_db()
    assert pushed.endpoint_url == api["ApiEndpoint"] + "/"
    assert pushed.function_arn == config["FunctionArn"]
    assert "arm64" in summary


@pytest.mark.parametrize(
    "step", ["ensure_api", "ensure_integration", "ensure_route", "ensure_stage", "ensure_permission"]
)
def test_a_provision_interrupted_after_any_step_completes_when_rerun(cloud, pushed, monkeypatch, step):
    real = getattr(aws, step)

    def interrupted(*args, **kwargs):
        raise TransientStageError("the worker died here")

    monkeypatch.setattr(aws, step, interrupted)
    with pytest.raises(TransientStageError):
        aws.provision(pushed)
    monkeypatch.setattr(aws, step, real)
    aws.provision(pushed)
    aws.provision(pushed)  # and once more, as a redelivered task would
    assert counts(cloud, pushed) == ONE_OF_EACH


def test_teardown_leaves_nothing_behind_and_says_what_it_deleted(cloud, pushed):
    aws.provision(pushed)
    pushed.refresh_from_db()
    summary = aws.teardown(pushed)
    assert f"HTTP API {pushed.api_id}" in summary
    assert f"Lambda function {aws.resource_name(pushed)}" in summary
    assert f"ECR repository {aws.repository_name(pushed)}" in summary
    assert counts(cloud, pushed) == {"apis": 0, "functions": 0}
    assert cloud["ecr"].describe_repositories()["repositories"] == []
    assert aws.teardown(pushed) == "nothing was left on AWS to delete"


def ready_on_aws(pushed) -> Deployment:
    aws.provision(pushed)
    pushed.refresh_from_db()
    pushed.status = Deployment.Status.READY
    pushed.save()
    return pushed


def test_stopping_an_aws_deployment_queues_its_teardown_and_the_task_deletes_everything(
    cloud, pushed, django_capture_on_commit_callbacks
):
    from deployments import services, tasks

    deployment = ready_on_aws(pushed)
    with django_capture_on_commit_callbacks() as queued:
        said = services.deployment_request_stop(deployment=deployment)
    assert "being deleted" in said
    assert Deployment.objects.get(pk=deployment.pk).status == Deployment.Status.STOPPING
    assert counts(cloud, deployment) == ONE_OF_EACH  # nothing deleted in the request itself
    assert len(queued) == 1
    with django_capture_on_commit_callbacks() as again:
        services.deployment_request_stop(deployment=Deployment.objects.get(pk=deployment.pk))
    assert again == []  # a second click queues no second teardown

    tasks.stop.apply(args=[deployment.pk]).get()
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.STOPPED and deployment.stopped_at is not None
    assert counts(cloud, deployment) == {"apis": 0, "functions": 0}
    assert "deleted HTTP API" in deployment.events.last().message
    tasks.stop.apply(args=[deployment.pk]).get()  # a redelivered task finds it stopped and does nothing
    assert Deployment.objects.get(pk=deployment.pk).status == Deployment.Status.STOPPED


def test_the_api_answers_202_while_an_aws_deployment_is_stopping(cloud, pushed, client, user):
    from rest_framework.authtoken.models import Token

    deployment = ready_on_aws(pushed)
    token = Token.objects.create(user=user).key
    url = reverse("api-deployment", args=[deployment.public_id])
    answer = client.delete(url, HTTP_AUTHORIZATION=f"Token {token}")
    assert answer.status_code == 202 and answer.json()["status"] == "stopping"
    client.force_login(user)
    fragment = client.get(reverse("deployment-status", args=[deployment.public_id])).content.decode()
    assert 'data-status="stopping"' in fragment and "Deleting its AWS resources" in fragment
    assert 'hx-trigger="every 1s"' in fragment  # the page keeps polling until it is stopped


def test_a_teardown_that_keeps_failing_marks_the_deployment_failed_with_why(cloud, pushed, monkeypatch):
    from deployments import services, tasks

    deployment = ready_on_aws(pushed)
    services.deployment_request_stop(deployment=deployment)

    def throttled(deployment):
        raise TransientStageError("AWS is throttling requests (TooManyRequestsException).")

    monkeypatch.setattr(aws, "teardown", throttled)
    tasks.stop.apply(args=[deployment.pk])  # eager: each retry runs at once, up to max_retries
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED and deployment.can_stop()
    assert deployment.error.startswith("Stopping failed: AWS is throttling") and deployment.stage == "teardown"
    assert "stop it again" in deployment.error
    assert deployment.events.filter(level="warning", message__contains="retrying").count() == tasks.stop.max_retries

    def refused(deployment):
        raise StageError("AWS refused: AccessDeniedException. Allow lambda:DeleteFunction to ServeML's IAM user.")

    monkeypatch.setattr(aws, "teardown", refused)
    services.deployment_request_stop(deployment=deployment)
    tasks.stop.apply(args=[deployment.pk])
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED and "lambda:DeleteFunction" in deployment.error


class Throttle:
    """AWS answering ThrottlingException to chosen operations, from inside botocore.

    A `before-call` handler answers for AWS, so botocore raises the ClientError exactly
    as for a real answer, inside paginators and waiters too. aws.client hands out these
    clients; the `cloud` fixture's own ones stay unthrottled for the test's checks."""

    def __init__(self, monkeypatch):
        self.clients = {
            name: boto3.client(name, region_name=REGION) for name in ("ecr", "lambda", "apigatewayv2", "sts")
        }
        self.rules, self.calls = {}, []
        monkeypatch.setattr(aws, "client", lambda service: self.clients[service])
        for client in self.clients.values():
            client.meta.events.register("before-call.*.*", self.answer)

    def operation(self, operation: str, *, after: int = 0) -> None:
        """Throttle every call of `operation` after the first `after` ones; calls count from now."""
        self.rules[operation] = after
        self.calls = []

    def stop(self) -> None:
        self.rules = {}

    def answer(self, model, **kwargs):
        self.calls.append(model.name)
        if model.name in self.rules and self.calls.count(model.name) > self.rules[model.name]:
            http = type("Answer", (), {"status_code": 400, "headers": {}})()
            return http, {
                "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
        return None


@pytest.fixture
def throttle(cloud, monkeypatch):
    return Throttle(monkeypatch)


def test_a_teardown_whose_list_call_stays_throttled_fails_with_why_and_can_be_stopped_again(cloud, pushed, throttle):
    from deployments import services, tasks

    deployment = ready_on_aws(pushed)
    services.deployment_request_stop(deployment=deployment)
    throttle.operation("GetApis")
    tasks.stop.apply(args=[deployment.pk])  # eager: each retry runs at once, up to max_retries
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED and deployment.stage == "teardown"
    assert "AWS was busy while trying to list the HTTP APIs (ThrottlingException)" in deployment.error
    assert throttle.calls.count("GetApis") == tasks.stop.max_retries + 1
    assert deployment.can_stop()

    throttle.stop()  # AWS calms down: stopping again deletes everything
    services.deployment_request_stop(deployment=deployment)
    tasks.stop.apply(args=[deployment.pk])
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.STOPPED
    assert counts(cloud, deployment) == {"apis": 0, "functions": 0}


@pytest.mark.parametrize(
    "operation",
    [
        "GetApis",
        "GetIntegrations",
        "GetRoutes",
        "GetStages",
        "GetPolicy",
        "DeleteApi",
        "DeleteFunction",
        "DeleteRepository",
    ],
)
def test_every_aws_call_of_provision_and_teardown_turns_throttling_into_a_retry(cloud, pushed, throttle, operation):
    throttle.operation(operation)
    with pytest.raises(TransientStageError, match="ThrottlingException"):
        aws.provision(pushed)
        pushed.refresh_from_db()
        aws.teardown(pushed)


def test_a_throttled_waiter_is_a_retry_not_a_function_that_failed(cloud, pushed, throttle):
    # The first GetFunction looks the function up; the waiter's, after create_function, is throttled.
    throttle.operation("GetFunction", after=1)
    with pytest.raises(TransientStageError, match="wait for the Lambda function .*ThrottlingException"):
        aws.provision(pushed)


def put_image(ecr, deployment, tag: str) -> None:
    """An image in the deployment's ECR repository under `tag`, as an earlier push left it."""
    aws.ensure_repository(ecr, aws.repository_name(deployment))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 1,
                "digest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),  # one image per tag
            },
            "layers": [],
        }
    )
    ecr.put_image(repositoryName=aws.repository_name(deployment), imageManifest=manifest, imageTag=tag)


def test_push_reuses_an_image_already_in_the_repository(cloud, user, make_deployment):
    from deployments.pipeline import stages

    deployment = make_deployment(user)
    stages.package(deployment)
    put_image(cloud["ecr"], deployment, image.image_tag(deployment))
    summary = aws.push(deployment)
    assert summary.startswith("reused")
    assert deployment.image_uri.endswith(f":{image.image_tag(deployment)}")


def change_one_input(change: str, deployment, settings, monkeypatch, tmp_path) -> None:
    from django.core.files.base import ContentFile

    from deployments import buildkit

    if change in ("handler", "loader"):
        name = f"serveml_{change}.py"
        edited = tmp_path / name
        edited.write_text(buildkit.HANDLER_FILES[name].read_text() + "\n# a fix\n")
        monkeypatch.setitem(buildkit.HANDLER_FILES, name, edited)
    elif change == "requirements":
        deployment.requirements_file.save("requirements.txt", ContentFile(f"{SKLEARN_PIN}numpy\n".encode()))
    elif change == "base image":
        settings.SERVEML_LAMBDA_BASE_IMAGE = "public.ecr.aws/lambda/python:3.12"
    elif change == "lambda platform":
        settings.SERVEML_LAMBDA_MANYLINUX = "manylinux_2_28"
    elif change == "architecture":
        settings.SERVEML_LAMBDA_ARCHITECTURE = "arm64"


IMAGE_INPUTS = ["handler", "loader", "requirements", "base image", "lambda platform", "architecture"]


@pytest.mark.parametrize("change", IMAGE_INPUTS)
def test_the_image_tag_changes_with_anything_that_goes_into_the_image(
    user, make_deployment, settings, monkeypatch, tmp_path, change
):
    from deployments.pipeline import stages

    deployment = make_deployment(user)
    stages.package(deployment)
    before = image.image_tag(deployment)
    stages.package(deployment)  # packaged again from the same inputs: the same image, reused
    assert image.image_tag(deployment) == before
    assert image.local_tag(deployment) == f"serveml/{deployment.public_id}:{before[:32]}"

    change_one_input(change, deployment, settings, monkeypatch, tmp_path)
    stages.package(deployment)
    assert image.image_tag(deployment) != before


def test_a_redeploy_with_a_new_handler_pushes_a_new_image_instead_of_reusing_the_old_one(
    cloud, user, make_deployment, settings, monkeypatch, tmp_path
):
    from deployments.pipeline import stages

    deployment = make_deployment(user)
    stages.package(deployment)
    put_image(cloud["ecr"], deployment, image.image_tag(deployment))  # the first deployment's image
    change_one_input("handler", deployment, settings, monkeypatch, tmp_path)
    stages.package(deployment)
    pushed = []
    monkeypatch.setattr(image, "docker_client", lambda: None)
    monkeypatch.setattr(
        image,
        "push_image",
        lambda client, source, repository, tag, auth: pushed.append((source, tag)) or "sha256:" + "1" * 64,
    )
    summary = aws.push(deployment)
    assert summary.startswith("pushed")
    assert pushed == [(image.local_tag(deployment), image.image_tag(deployment))]
    assert deployment.image_uri.endswith("@sha256:" + "1" * 64)


def test_the_ecr_repository_is_created_once(cloud):
    first = aws.ensure_repository(cloud["ecr"], "serveml/abc")
    again = aws.ensure_repository(cloud["ecr"], "serveml/abc")
    assert first["repositoryUri"] == again["repositoryUri"]
    assert len(cloud["ecr"].describe_repositories()["repositories"]) == 1


def client_error(code: str, status: int = 400, message: str = "nope") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    "error",
    [client_error("ThrottlingException"), client_error("TooManyRequestsException", 429), client_error("Whatever", 503)],
)
def test_throttling_and_server_errors_are_transient(error):
    assert isinstance(aws.classify(error, "do it"), TransientStageError)


def test_access_denied_fails_with_what_to_fix():
    error = aws.classify(client_error("AccessDeniedException", 403, "not allowed: lambda:CreateFunction"), "create it")
    assert not isinstance(error, TransientStageError) and isinstance(error, StageError)
    assert "lambda:CreateFunction" in str(error) and "IAM" in str(error)


def test_an_image_too_large_fails_with_what_to_fix():
    error = aws.classify(client_error("InvalidParameterValueException", 400, "Image size is too large"), "create it")
    assert "drop packages" in str(error)


def upload_form(client, iris_rf_bytes, target):
    return client.post(
        reverse("deployment-new"),
        {
            "model_file": SimpleUploadedFile("model.pkl", iris_rf_bytes),
            "requirements_file": SimpleUploadedFile("requirements.txt", SKLEARN_PIN.encode()),
            "target": target,
        },
    )


def test_the_aws_target_is_refused_with_what_to_configure(client, user, iris_rf_bytes, settings):
    settings.SERVEML_LAMBDA_ROLE_ARN = ""
    client.force_login(user)
    page = upload_form(client, iris_rf_bytes, "aws").content.decode()
    assert "SERVEML_LAMBDA_ROLE_ARN" in page and "local target works" in page
    assert Deployment.objects.count() == 0


def test_the_aws_target_is_accepted_when_configured(client, user, iris_rf_bytes, settings):
    settings.SERVEML_AWS_REGION, settings.SERVEML_LAMBDA_ROLE_ARN = REGION, "arn:aws:iam::123456789012:role/x"
    client.force_login(user)
    upload_form(client, iris_rf_bytes, "aws")
    assert Deployment.objects.get().target == "aws"


def test_the_aws_smoke_test_is_skipped_without_credentials(settings, monkeypatch, capsys):
    from django.core.management import call_command

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    settings.SERVEML_LAMBDA_ROLE_ARN = ""
    call_command("aws_smoke")
    assert "aws-smoke skipped" in capsys.readouterr().out


# ------------------------------------------------------------------ private endpoints on AWS


def function_variables(cloud, deployment) -> dict:
    config = cloud["lambda"].get_function_configuration(FunctionName=aws.resource_name(deployment))
    return config.get("Environment", {}).get("Variables", {})


def digests_in(variables: dict) -> set:
    return {digest for digest in variables.get("SERVEML_KEY_SHA256", "").split(",") if digest}


@pytest.fixture
def access_task_runs(monkeypatch):
    """The access task runs in this process when its on_commit callback fires, as a worker would run it."""
    from deployments import tasks

    monkeypatch.setattr(tasks.sync_access, "delay", lambda pk: tasks.sync_access.apply(args=[pk]))


def test_provision_gives_the_function_the_deployments_privacy_and_key_digests(cloud, pushed):
    from deployments import services

    key, _ = services.deployment_key_create(deployment=pushed, name="ci")
    assert pushed.is_private  # the first key made it private
    aws.provision(pushed)
    variables = function_variables(cloud, pushed)
    assert variables["SERVEML_PRIVATE"] == "1" and digests_in(variables) == {key.key_sha256}
    assert variables["SERVEML_DEPLOYMENT"] == str(pushed.public_id)


def test_a_redeploy_keeps_an_operators_own_variables_and_drops_revoked_keys(cloud, pushed):
    from deployments import services

    key, _ = services.deployment_key_create(deployment=pushed, name="ci")
    aws.provision(pushed)
    cloud["lambda"].update_function_configuration(
        FunctionName=aws.resource_name(pushed),
        Environment={"Variables": {**function_variables(cloud, pushed), "OMP_NUM_THREADS": "1"}},
    )
    services.deployment_key_revoke(key=key)
    aws.provision(pushed)
    variables = function_variables(cloud, pushed)
    assert variables["OMP_NUM_THREADS"] == "1"
    assert variables["SERVEML_PRIVATE"] == "1" and digests_in(variables) == set()


def test_a_key_created_while_the_function_is_being_created_still_reaches_it(cloud, pushed, monkeypatch):
    from deployments import services

    real = aws.ensure_api
    created = []

    def owner_creates_a_key_meanwhile(gateway, deployment):
        # The function exists with the keys read before; this key's task would find no function_arn.
        created.append(
            services.deployment_key_create(deployment=Deployment.objects.get(pk=deployment.pk), name="early")[0]
        )
        return real(gateway, deployment)

    monkeypatch.setattr(aws, "ensure_api", owner_creates_a_key_meanwhile)
    aws.provision(pushed)
    variables = function_variables(cloud, pushed)
    assert variables["SERVEML_PRIVATE"] == "1" and digests_in(variables) == {created[0].key_sha256}


def test_creating_a_key_on_an_aws_deployment_puts_its_digest_in_the_function_after_the_request(
    cloud, pushed, access_task_runs, django_capture_on_commit_callbacks
):
    from deployments import services

    deployment = ready_on_aws(pushed)
    assert function_variables(cloud, deployment)["SERVEML_PRIVATE"] == "0"
    with django_capture_on_commit_callbacks() as queued:
        key, _ = services.deployment_key_create(deployment=deployment, name="ci")
    # Nothing changed on AWS inside the request, and the page says so rather than claim it is done.
    assert digests_in(function_variables(cloud, deployment)) == set()
    assert "updating the Lambda function: it will need an API key such as ci" in deployment.events.last().message
    assert len(queued) == 1

    queued[0]()  # the transaction committed: the worker runs the task
    variables = function_variables(cloud, deployment)
    assert variables["SERVEML_PRIVATE"] == "1" and digests_in(variables) == {key.key_sha256}
    assert "now requires one of its 1 active API key(s)" in deployment.events.last().message


def test_a_revoked_key_leaves_the_functions_environment(
    cloud, pushed, access_task_runs, django_capture_on_commit_callbacks
):
    from deployments import services

    deployment = ready_on_aws(pushed)
    with django_capture_on_commit_callbacks(execute=True):
        kept, _ = services.deployment_key_create(deployment=deployment, name="kept")
        revoked, _ = services.deployment_key_create(deployment=deployment, name="leaked")
    assert digests_in(function_variables(cloud, deployment)) == {kept.key_sha256, revoked.key_sha256}
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_key_revoke(key=revoked)
    assert digests_in(function_variables(cloud, deployment)) == {kept.key_sha256}
    assert function_variables(cloud, deployment)["SERVEML_PRIVATE"] == "1"


def test_making_an_aws_deployment_public_tells_the_function(
    cloud, pushed, access_task_runs, django_capture_on_commit_callbacks
):
    from deployments import services

    deployment = ready_on_aws(pushed)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_key_create(deployment=deployment, name="ci")
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_set_private(deployment=deployment, private=False)
    assert function_variables(cloud, deployment)["SERVEML_PRIVATE"] != "1"
    messages = list(deployment.events.values_list("message", flat=True))
    assert messages[-3:] == [
        "endpoint set to public",
        "updating the Lambda function: until that is done, calls without a key are still refused",
        f"the Lambda function {aws.resource_name(deployment)} now answers without a key (public)",
    ]
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_set_private(deployment=deployment, private=True)
    assert function_variables(cloud, deployment)["SERVEML_PRIVATE"] == "1"


class ThrottledLambda:
    """The moto Lambda client, except that updating the configuration is throttled `times` times."""

    def __init__(self, real, times: int):
        self.real, self.times = real, times

    def update_function_configuration(self, **kwargs):
        if self.times:
            self.times -= 1
            raise client_error("TooManyRequestsException", 429, "Rate exceeded")
        return self.real.update_function_configuration(**kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_the_access_task_retries_a_throttled_update_until_it_goes_through(cloud, pushed, monkeypatch):
    from deployments import services, tasks

    deployment = ready_on_aws(pushed)
    key, _ = services.deployment_key_create(deployment=deployment, name="ci")
    throttled = ThrottledLambda(cloud["lambda"], times=2)
    monkeypatch.setattr(aws, "client", lambda service: throttled)
    tasks.sync_access.apply(args=[deployment.pk])  # eager: each retry runs at once
    assert digests_in(function_variables(cloud, deployment)) == {key.key_sha256}
    assert deployment.events.filter(level="warning", message__contains="retrying").count() == 2
    assert not deployment.events.filter(level="error").exists()


def test_an_update_that_stays_throttled_records_why_and_how_to_retry(cloud, pushed, monkeypatch):
    from deployments import services, tasks

    deployment = ready_on_aws(pushed)
    services.deployment_key_create(deployment=deployment, name="ci")
    throttled = ThrottledLambda(cloud["lambda"], times=100)
    monkeypatch.setattr(aws, "client", lambda service: throttled)
    tasks.sync_access.apply(args=[deployment.pk])
    assert function_variables(cloud, deployment)["SERVEML_PRIVATE"] == "0"  # never applied
    assert (
        deployment.events.filter(level="warning", message__contains="retrying").count() == tasks.sync_access.max_retries
    )
    failure = deployment.events.get(level="error").message
    assert failure.startswith("Updating the Lambda function's keys failed: AWS was busy")
    assert "may not reflect" in failure and "switch the endpoint between public and private again" in failure
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.READY  # still serving; only its keys lag


def test_an_aws_deployment_refuses_more_keys_than_its_function_can_hold(cloud, pushed, client, user):
    from rest_framework.authtoken.models import Token

    from deployments import services

    deployment = ready_on_aws(pushed)
    for number in range(aws.MAX_KEYS):
        services.deployment_key_create(deployment=deployment, name=f"k{number}")
    with pytest.raises(services.KeyRefused, match="Revoke keys that are no longer used"):
        services.deployment_key_create(deployment=deployment, name="one too many")
    token = Token.objects.create(user=user).key
    answer = client.post(
        reverse("api-deployment-keys", args=[deployment.public_id]),
        {"name": "x"},
        HTTP_AUTHORIZATION=f"Token {token}",
        content_type="application/json",
    )
    assert answer.status_code == 409 and "4 KB" in answer.json()["error"]
    client.force_login(user)
    page = client.post(reverse("deployment-key-create", args=[deployment.public_id]), {"name": "x"}, follow=True)
    assert "Revoke keys that are no longer used" in page.content.decode()
    assert deployment.active_keys().count() == aws.MAX_KEYS
    # All of them fit in the function's environment, with room to spare.
    assert len(json.dumps(aws.function_environment(deployment))) < 3500


# ------------------------------------------------------------------ verify sends no runtime token off the host


@pytest.fixture
def sent(monkeypatch, iris_rf):
    """Every request verify sends, through httpx.MockTransport; the endpoint answers what validation predicted."""
    from deployments.pipeline import stages

    return recorded_posts(monkeypatch, stages, {"prediction": 0, "model_type": "RandomForestClassifier"})


def with_example(deployment) -> Deployment:
    deployment.example_request = {"data": [0.0, 0.0, 0.0, 0.0]}
    deployment.example_response = {"prediction": 0, "model_type": "RandomForestClassifier"}
    deployment.save()
    return deployment


def test_verify_sends_no_runtime_token_to_a_public_aws_endpoint(cloud, pushed, sent):
    from deployments.pipeline import stages

    deployment = with_example(ready_on_aws(pushed))
    stages.verify(deployment)
    [request] = sent
    assert str(request.url) == deployment.endpoint_url
    assert "x-serveml-internal" not in request.headers and "authorization" not in request.headers


def test_verify_calls_a_private_aws_endpoint_with_a_one_off_key_it_revokes_after(cloud, pushed, sent, monkeypatch):
    import hashlib

    from deployments import services
    from deployments.pipeline import stages

    deployment = with_example(ready_on_aws(pushed))
    owners, _ = services.deployment_key_create(deployment=deployment, name="owner's")
    aws.update_access(deployment)
    seen = []
    real_post = stages.httpx.post

    def post(url, **kwargs):  # what the function holds at the moment of the call
        seen.append(function_variables(cloud, deployment))
        return real_post(url, **kwargs)

    monkeypatch.setattr(stages.httpx, "post", post)
    summary = stages.verify(deployment)
    [request] = sent
    assert "x-serveml-internal" not in request.headers
    presented = request.headers["authorization"].removeprefix("Bearer ")
    digest = hashlib.sha256(presented.encode()).hexdigest()
    assert seen[0]["SERVEML_PRIVATE"] == "1" and digest in digests_in(seen[0])
    # Afterwards the function knows only the owner's key again, and the one-off key is revoked.
    assert digests_in(function_variables(cloud, deployment)) == {owners.key_sha256}
    assert list(deployment.active_keys()) == [owners]
    assert "one-off key, revoked after the call" in summary


def test_verify_still_sends_the_runtime_token_to_the_local_runtimes_internal_url(user, make_deployment, sent, settings):
    from deployments.pipeline import stages

    deployment = with_example(make_deployment(user))
    stages.verify(deployment)
    [request] = sent
    assert str(request.url).startswith(settings.SERVEML_RUNTIME_INTERNAL_URL)
    assert request.headers["x-serveml-internal"] == settings.SERVEML_RUNTIME_TOKEN


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("1.dkr.ecr.us-east-1.amazonaws.com/serveml/abc@sha256:00ff", {"imageDigest": "sha256:00ff"}),
        ("1.dkr.ecr.us-east-1.amazonaws.com/serveml/abc:1a2b", {"imageTag": "1a2b"}),
        ("localhost:5000/serveml/abc:1a2b", {"imageTag": "1a2b"}),
        ("localhost:5000/serveml/abc", None),  # no tag: the colon is the port's
        ("1.dkr.ecr.us-east-1.amazonaws.com/serveml/abcd:1a2b", None),  # another deployment's repository
        ("1.dkr.ecr.us-east-1.amazonaws.com/other/serveml/abc-x@sha256:00ff", None),
        ("", None),
    ],
)
def test_only_an_image_of_the_deployments_own_repository_is_ever_named_for_deletion(uri, expected):
    assert aws.image_id(uri, "serveml/abc") == expected
