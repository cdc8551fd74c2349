"""The aws target: after package, build (aws_image.py: the Lambda image, with no
network), push to the deployment's ECR repository, and provision a Lambda function
(PackageType Image) with an API Gateway HTTP API in front of it, with boto3.

Every step looks for what an earlier, interrupted run may have created before
creating it, so rerunning a half-finished provision completes it instead of
failing on "already exists". botocore retries throttling and 5xx answers with
backoff and jitter (adaptive mode, capped); what still fails is classified
here: transient errors retry the Celery task, permanent ones fail the stage
with what to fix. Every AWS call goes through `call` (lists through `items`,
waiters through `_wait`), so no botocore error reaches a task unclassified:
a teardown that AWS keeps throttling ends `failed` with why, never stuck in
`stopping`.
"""

import base64
import json
from contextlib import contextmanager
from functools import lru_cache

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, WaiterError
from django.conf import settings

from deployments import targets
from deployments.models import Deployment, DeploymentKey
from deployments.pipeline.errors import StageError, TransientStageError
from deployments.targets import aws_image

RETRIES = Config(retries={"max_attempts": 6, "mode": "adaptive"}, connect_timeout=10, read_timeout=60)
TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "ServiceException",
    "InternalFailure",
    "InternalServerError",
    "InternalServiceError",
    "RequestTimeout",
    "RequestTimeoutException",
    "EC2ThrottledException",
}
PERMISSION_STATEMENT = "serveml-apigateway-invoke"
# ServeML's JSON at the root; the Open Inference Protocol (V2) under /v2 ({proxy+} needs a segment).
ROUTE_KEYS = ("POST /", "GET /v2", "ANY /v2/{proxy+}")
MAX_KEYS = targets.get(Deployment.Target.AWS).max_keys  # what the function's 4 KB environment holds
# The variables the handler's `authorised()` reads; ServeML owns them, an operator's others are kept.
ACCESS_VARIABLES = ("SERVEML_PRIVATE", "SERVEML_KEY_SHA256")


def client(service: str):
    return boto3.client(service, region_name=settings.SERVEML_AWS_REGION, config=RETRIES)


def call(method, doing: str, *, ignore: tuple[str, ...] = (), **kwargs):
    """Call boto3, turning its errors into stage errors a person can act on.

    Returns None when AWS answers with one of the `ignore` error codes (the thing
    looked up is not there, or was added meanwhile): boto3's answers are dicts."""
    try:
        return method(**kwargs)
    except ClientError as exc:
        if _code(exc) in ignore:
            return None
        raise classify(exc, doing) from None
    except BotoCoreError as exc:  # endpoint unreachable, credentials missing, …
        raise TransientStageError(f"AWS did not answer while trying to {doing}: {exc}") from None


def items(client, operation: str, doing: str, **kwargs) -> list[dict]:
    """Every item of an API Gateway list, all pages, through the same classified retry as `call`."""
    pages = client.get_paginator(operation).paginate(**kwargs)
    return call(lambda: [item for page in pages for item in page["Items"]], doing)


def classify(exc: ClientError, doing: str) -> StageError:
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", str(exc))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in TRANSIENT_CODES or status >= 500:
        return TransientStageError(f"AWS was busy while trying to {doing} ({code}): {message}")
    if "AccessDenied" in code or code in {"UnauthorizedOperation", "UnrecognizedClientException"}:
        return StageError(
            f"AWS refused to {doing} ({code}): {message}. Give the worker's IAM identity this permission; "
            "the README lists the least-privilege policy."
        )
    if "too large" in message.lower() or code == "CodeStorageExceededException":
        return StageError(
            f"AWS refused to {doing}: {message}. Lambda images must stay under 10 GB uncompressed; "
            "drop packages the model does not need from requirements.txt."
        )
    return StageError(f"AWS refused to {doing} ({code}): {message}")


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


@lru_cache(maxsize=1)
def account_id() -> str:
    return call(client("sts").get_caller_identity, "read the AWS account id")["Account"]


def resource_name(deployment: Deployment) -> str:
    return f"serveml-{deployment.public_id}"


def repository_name(deployment: Deployment) -> str:
    return f"{settings.SERVEML_ECR_REPOSITORY_PREFIX}/{deployment.public_id}"


# ------------------------------------------------------------------ ECR


def ensure_repository(ecr, name: str) -> dict:
    found = call(
        ecr.describe_repositories,
        "look up the ECR repository",
        ignore=("RepositoryNotFoundException",),
        repositoryNames=[name],
    )
    if found:
        return found["repositories"][0]
    return call(
        ecr.create_repository,
        "create the ECR repository",
        repositoryName=name,
        imageScanningConfiguration={"scanOnPush": True},
        tags=[{"Key": "serveml", "Value": "true"}],
    )["repository"]


def image_exists(ecr, repository: str, tag: str) -> bool:
    found = call(
        ecr.describe_images,
        "look up the image in ECR",
        ignore=("ImageNotFoundException", "RepositoryNotFoundException"),
        repositoryName=repository,
        imageIds=[{"imageTag": tag}],
    )
    return found is not None


# ------------------------------------------------------------------ Lambda + API Gateway


def access_variables(deployment: Deployment) -> dict:
    """The function's share of the deployment's privacy and active keys, as the handler reads them.

    Read from the database, not from the object: the pipeline's copy of the row was
    loaded before its owner may have switched privacy or created a key."""
    private = Deployment.objects.values_list("is_private", flat=True).get(pk=deployment.pk)
    digests = sorted(deployment.active_keys().values_list("key_sha256", flat=True))
    variables = {"SERVEML_PRIVATE": "1" if private else "0"}
    if digests:  # omitted rather than empty: Lambda may refuse an empty value
        variables["SERVEML_KEY_SHA256"] = ",".join(digests)
    return variables


def function_environment(deployment: Deployment, current: dict | None = None) -> dict:
    """The function's variables: any an operator added, then ServeML's own (stale ones dropped)."""
    kept = {name: value for name, value in (current or {}).items() if name not in ACCESS_VARIABLES}
    return {**kept, "SERVEML_DEPLOYMENT": str(deployment.public_id), **access_variables(deployment)}


def ensure_function(lam, deployment: Deployment) -> tuple[str, dict]:
    """Create or update the function; returns its ARN and the access variables it was given."""
    name = resource_name(deployment)
    found = call(
        lam.get_function, "look up the Lambda function", ignore=("ResourceNotFoundException",), FunctionName=name
    )
    existing = found["Configuration"] if found else None
    current = (existing or {}).get("Environment", {}).get("Variables", {})
    variables = function_environment(deployment, current)
    config = {
        "Role": settings.SERVEML_LAMBDA_ROLE_ARN,
        "MemorySize": settings.SERVEML_LAMBDA_MEMORY_MB,
        "Timeout": settings.SERVEML_LAMBDA_TIMEOUT_S,
        "Environment": {"Variables": variables},
    }
    applied = {name: value for name, value in variables.items() if name in ACCESS_VARIABLES}
    if existing is None:
        created = call(
            lam.create_function,
            "create the Lambda function",
            FunctionName=name,
            PackageType="Image",
            Code={"ImageUri": deployment.image_uri},
            Architectures=[settings.SERVEML_LAMBDA_ARCHITECTURE],
            Tags={"serveml": "true"},
            **config,
        )
        arn = created["FunctionArn"]
        _wait(lam, "function_active_v2", name)
        return arn, applied
    # A rerun, or a redeploy: bring the function to this image and these settings.
    call(
        lam.update_function_code,
        "update the Lambda function's image",
        FunctionName=name,
        ImageUri=deployment.image_uri,
        Architectures=[settings.SERVEML_LAMBDA_ARCHITECTURE],
    )
    _wait(lam, "function_updated_v2", name)
    call(lam.update_function_configuration, "configure the Lambda function", FunctionName=name, **config)
    _wait(lam, "function_updated_v2", name)
    return existing["FunctionArn"], applied


def update_access(deployment: Deployment, lam=None) -> str:
    """Bring the function's privacy and keys in step with the deployment's; say what it now does.

    Only ServeML's two variables change; every other one is written back as it was
    (update_function_configuration replaces the whole environment)."""
    lam = lam or client("lambda")
    name = resource_name(deployment)
    # get_function, not get_function_configuration: the README's IAM policy already allows it.
    found = call(
        lam.get_function,
        "read the Lambda function's configuration",
        ignore=("ResourceNotFoundException",),
        FunctionName=name,
    )
    if not found:
        return "no Lambda function to update: its next deployment applies the keys"
    current = found["Configuration"].get("Environment", {}).get("Variables", {})
    variables = function_environment(deployment, current)
    updated = call(
        lam.update_function_configuration,
        "update the Lambda function's keys",
        ignore=("ResourceConflictException",),
        FunctionName=name,
        Environment={"Variables": variables},
    )
    if updated is None:  # another update (a deploy, a key) is still running
        raise TransientStageError(f"the Lambda function {name} is still applying an earlier update")
    _wait(lam, "function_updated_v2", name)
    if variables["SERVEML_PRIVATE"] != "1":
        return f"the Lambda function {name} now answers without a key (public)"
    count = len([digest for digest in variables.get("SERVEML_KEY_SHA256", "").split(",") if digest])
    if not count:
        return f"the Lambda function {name} is private with no active key: it answers nobody"
    return f"the Lambda function {name} now requires one of its {count} active API key(s)"


@contextmanager
def verify_headers(deployment: Deployment):
    """The verify stage's headers, and a note for its summary.

    A public function needs none. A private one answers only its keys, and the runtime's
    token stays on this host: verify gets a key that exists only for its call. ServeML
    keeps only digests, so it holds no key of the owner's to call with. The alternative,
    verifying before privacy applies, would leave a private deployment's stable URL open
    to anyone while a new version is verified; a key the worker makes, applies, uses
    once and revokes costs two configuration updates instead."""
    if not Deployment.objects.values_list("is_private", flat=True).get(pk=deployment.pk):
        yield {}, ""
        return
    key, raw = DeploymentKey.issue(deployment=deployment, name="ServeML verify (revoked after the call)")
    try:
        update_access(deployment)
        yield {"Authorization": f"Bearer {raw}"}, " (private: with a one-off key, revoked after the call)"
    finally:
        key.revoke()
        update_access(deployment)


def _wait(lam, waiter: str, name: str) -> None:
    try:
        lam.get_waiter(waiter).wait(FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
    except WaiterError as exc:
        answer = exc.last_response or {}
        if "Error" in answer:  # the waiter's own call failed (throttled, say): not the function's fault
            raise classify(ClientError(answer, "GetFunction"), f"wait for the Lambda function {name}") from None
        raise StageError(f"The Lambda function {name} did not become ready: {exc}") from None
    except BotoCoreError as exc:
        raise TransientStageError(f"AWS did not answer while waiting for the Lambda function {name}: {exc}") from None


def ensure_api(gateway, deployment: Deployment) -> dict:
    name = resource_name(deployment)
    for api in items(gateway, "get_apis", "list the HTTP APIs"):
        if api["Name"] == name:
            return api
    return call(gateway.create_api, "create the HTTP API", Name=name, ProtocolType="HTTP", Tags={"serveml": "true"})


def ensure_integration(gateway, api_id: str, function_arn: str) -> str:
    for item in items(gateway, "get_integrations", "list the HTTP API's integrations", ApiId=api_id):
        if item.get("IntegrationUri") == function_arn:
            return item["IntegrationId"]
    return call(
        gateway.create_integration,
        "connect the HTTP API to the function",
        ApiId=api_id,
        IntegrationType="AWS_PROXY",
        IntegrationUri=function_arn,
        IntegrationMethod="POST",
        PayloadFormatVersion="2.0",
    )["IntegrationId"]


def ensure_route(gateway, api_id: str, integration_id: str) -> None:
    present = {route["RouteKey"] for route in items(gateway, "get_routes", "list the HTTP API's routes", ApiId=api_id)}
    for key in ROUTE_KEYS:
        if key not in present:
            call(
                gateway.create_route,
                f"add the route {key}",
                ApiId=api_id,
                RouteKey=key,
                Target=f"integrations/{integration_id}",
            )


def ensure_stage(gateway, api_id: str) -> None:
    if any(
        stage["StageName"] == "$default"
        for stage in items(gateway, "get_stages", "list the HTTP API's stages", ApiId=api_id)
    ):
        return
    call(gateway.create_stage, "create the $default stage", ApiId=api_id, StageName="$default", AutoDeploy=True)


def ensure_permission(lam, deployment: Deployment, api_id: str) -> None:
    name = resource_name(deployment)
    found = call(
        lam.get_policy, "read the Lambda function's policy", ignore=("ResourceNotFoundException",), FunctionName=name
    )  # not found: no policy yet
    if found and any(
        statement.get("Sid") == PERMISSION_STATEMENT for statement in json.loads(found["Policy"])["Statement"]
    ):
        return
    source = f"arn:aws:execute-api:{settings.SERVEML_AWS_REGION}:{account_id()}:{api_id}/*/*"
    call(  # a conflict means it was added meanwhile: fine
        lam.add_permission,
        "let API Gateway invoke the function",
        ignore=("ResourceConflictException",),
        FunctionName=name,
        StatementId=PERMISSION_STATEMENT,
        Action="lambda:InvokeFunction",
        Principal="apigateway.amazonaws.com",
        SourceArn=source,
    )


# ------------------------------------------------------------------ the stages after package

build = aws_image.build


def push(deployment: Deployment) -> str:
    ecr = client("ecr")
    name = repository_name(deployment)
    repository = ensure_repository(ecr, name)
    tag = aws_image.image_tag(deployment)
    if image_exists(ecr, name, tag):
        deployment.update(image_uri=f"{repository['repositoryUri']}:{tag}")
        return f"reused {repository['repositoryUri']}:{tag[:12]}…: the same build inputs were pushed before"
    token = call(ecr.get_authorization_token, "get an ECR login token")["authorizationData"][0]
    username, password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)
    digest = aws_image.push_image(
        aws_image.docker_client(),
        aws_image.local_tag(deployment),
        repository["repositoryUri"],
        tag,
        {"username": username, "password": password, "serveraddress": token["proxyEndpoint"]},
    )
    deployment.update(
        image_uri=f"{repository['repositoryUri']}@{digest}" if digest else f"{repository['repositoryUri']}:{tag}",
    )
    size = deployment.image_size_bytes or 0
    return f"pushed {repository['repositoryUri']} ({size / 1024**2:.0f} MB, {digest or 'tag ' + tag[:12]})"


def provision(deployment: Deployment) -> str:
    lam, gateway = client("lambda"), client("apigatewayv2")
    function_arn, applied = ensure_function(lam, deployment)
    deployment.update(function_arn=function_arn)
    api = ensure_api(gateway, deployment)
    deployment.update(api_id=api["ApiId"])
    integration_id = ensure_integration(gateway, api["ApiId"], function_arn)
    ensure_route(gateway, api["ApiId"], integration_id)
    ensure_stage(gateway, api["ApiId"])
    ensure_permission(lam, deployment, api["ApiId"])
    # Keys or privacy changed while the function was being created: the access task may have
    # found no function_arn yet and left it to this stage, so apply what the owner set since.
    if access_variables(deployment) != applied:
        update_access(deployment, lam)
    deployment.update(endpoint_url=f"{api['ApiEndpoint'].rstrip('/')}/")
    return (
        f"Lambda function {resource_name(deployment)} ({settings.SERVEML_LAMBDA_MEMORY_MB} MB, "
        f"{settings.SERVEML_LAMBDA_TIMEOUT_S} s, {settings.SERVEML_LAMBDA_ARCHITECTURE}) behind HTTP API "
        f"{api['ApiId']}"
    )


def teardown(deployment: Deployment) -> str:
    """Delete the API, the function and the repository; say what was deleted."""
    deleted = []

    def delete(what: str, method, missing: str, **kwargs) -> None:
        """Delete `what`; gone already (AWS answers `missing`) is not an error, and not listed."""
        if call(method, f"delete the {what}", ignore=(missing,), **kwargs) is not None:
            deleted.append(what)

    gateway, lam, ecr = client("apigatewayv2"), client("lambda"), client("ecr")
    # The APIs named for this deployment: the one on record and any an interrupted run left behind.
    api_ids = {
        api["ApiId"]
        for api in items(gateway, "get_apis", "list the HTTP APIs")
        if api["Name"] == resource_name(deployment) or api["ApiId"] == deployment.api_id
    }
    for api_id in sorted(api_ids):
        delete(f"HTTP API {api_id}", gateway.delete_api, "NotFoundException", ApiId=api_id)
    function = resource_name(deployment)
    delete(f"Lambda function {function}", lam.delete_function, "ResourceNotFoundException", FunctionName=function)
    repository = repository_name(deployment)
    delete(
        f"ECR repository {repository}",
        ecr.delete_repository,
        "RepositoryNotFoundException",
        repositoryName=repository,
        force=True,
    )
    return "deleted " + ", ".join(deleted) if deleted else "nothing was left on AWS to delete"
