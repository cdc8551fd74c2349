"""The aws target's AWS calls, against moto: ECR, Lambda, API Gateway, and teardown."""

import json

import boto3
import pytest
from botocore.exceptions import ClientError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from moto import mock_aws

from deployments.models import Deployment
from deployments.pipeline import aws, image
from deployments.pipeline.errors import StageError, TransientStageError
from tests.conftest import SKLEARN_PIN

pytestmark = pytest.mark.django_db
REGION = "us-east-1"


@pytest.fixture(autouse=True)
def no_enqueue(monkeypatch):
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)


@pytest.fixture
def cloud(settings, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        aws.account_id.cache_clear()
        role = boto3.client("iam", region_name=REGION).create_role(
            RoleName="serveml-lambda",
            AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
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


ONE_OF_EACH = {"apis": 1, "functions": 1, "integrations": 1, "routes": 1, "stages": 1, "permissions": 1}


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
    assert integration["IntegrationUri"] == config["FunctionArn"]
    [route] = gateway.get_routes(ApiId=pushed.api_id)["Items"]
    assert route["RouteKey"] == "POST /" and route["Target"] == f"integrations/{integration['IntegrationId']}"
    [stage] = gateway.get_stages(ApiId=pushed.api_id)["Items"]
    assert stage["StageName"] == "$default" and stage["AutoDeploy"] is True
    [statement] = json.loads(cloud["lambda"].get_policy(FunctionName=aws.resource_name(pushed))["Policy"])["Statement"]
    assert statement["Principal"]["Service"] == "apigateway.amazonaws.com"
    assert pushed.api_id in json.dumps(statement["Condition"])
    pushed.refresh_from_db()
    assert pushed.endpoint_url == api["ApiEndpoint"] + "/"
    assert pushed.function_arn == config["FunctionArn"]
    assert "arm64" in summary


@pytest.mark.parametrize("step", ["ensure_api", "ensure_integration", "ensure_route", "ensure_stage", "ensure_permission"])
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


def test_push_reuses_an_image_already_in_the_repository(cloud, user, make_deployment):
    deployment = make_deployment(user)
    ecr = cloud["ecr"]
    aws.ensure_repository(ecr, aws.repository_name(deployment))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                                      "digest": "sha256:" + "0" * 64}, "layers": []})
    ecr.put_image(repositoryName=aws.repository_name(deployment), imageManifest=manifest,
                  imageTag=deployment.model_sha256)
    summary = image.push(deployment)
    assert summary.startswith("reused")
    assert deployment.image_uri.endswith(f":{deployment.model_sha256}")


def test_the_ecr_repository_is_created_once(cloud):
    first = aws.ensure_repository(cloud["ecr"], "serveml/abc")
    again = aws.ensure_repository(cloud["ecr"], "serveml/abc")
    assert first["repositoryUri"] == again["repositoryUri"]
    assert len(cloud["ecr"].describe_repositories()["repositories"]) == 1


def client_error(code: str, status: int = 400, message: str = "nope") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "Op")


@pytest.mark.parametrize("error", [client_error("ThrottlingException"), client_error("TooManyRequestsException", 429),
                                   client_error("Whatever", 503)])
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
    return client.post(reverse("deployment-new"), {
        "model_file": SimpleUploadedFile("model.pkl", iris_rf_bytes),
        "requirements_file": SimpleUploadedFile("requirements.txt", SKLEARN_PIN.encode()),
        "target": target,
    })


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
