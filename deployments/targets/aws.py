"""The aws target: after package, build (aws_image.py: the Lambda image, with no
network), push to the deployment's ECR repository, and provision a Lambda function
(PackageType Image) with an API Gateway HTTP API in front of it, with boto3.

Versions: each version of a deployment (the first one too) is a published Lambda
version of the deployment's one function, its image in the deployment's one
repository. The HTTP API invokes the alias `live`, never the bare function: promote
and rollback are one update_alias (atomic; the URL never changes), a canary is the
alias's weighted routing. A published version's environment is frozen, and the
function's environment holds its keys, so an alias is only ever pointed at a Lambda
version that carries the deployment's keys as they are now (current_lambda_version).

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
import logging
import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, WaiterError
from django.conf import settings
from django.db.models import Q

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
log = logging.getLogger("serveml.aws")
PERMISSION_STATEMENT = "serveml-apigateway-invoke"
ALIAS = "live"  # what the HTTP API invokes; it points at the Lambda version that serves
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
    # A version lives in its deployment's function (as a Lambda version) and repository.
    return f"serveml-{deployment.root.public_id}"


def repository_name(deployment: Deployment) -> str:
    return f"{settings.SERVEML_ECR_REPOSITORY_PREFIX}/{deployment.root.public_id}"


def alias_arn(root: Deployment) -> str:
    return f"{root.function_arn}:{ALIAS}"


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
    loaded before its owner may have switched privacy or created a key. A version answers
    with its deployment's privacy and keys."""
    root = deployment.root
    private = Deployment.objects.values_list("is_private", flat=True).get(pk=root.pk)
    digests = sorted(root.active_keys().values_list("key_sha256", flat=True))
    variables = {"SERVEML_PRIVATE": "1" if private else "0"}
    if digests:  # omitted rather than empty: Lambda may refuse an empty value
        variables["SERVEML_KEY_SHA256"] = ",".join(digests)
    return variables


def function_environment(deployment: Deployment, current: dict | None = None) -> dict:
    """The function's variables: any an operator added, then ServeML's own (stale ones dropped)."""
    kept = {name: value for name, value in (current or {}).items() if name not in ACCESS_VARIABLES}
    return {**kept, "SERVEML_DEPLOYMENT": str(deployment.root.public_id), **access_variables(deployment)}


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
    # What the alias serves is a published version, whose environment never changes: serve the
    # same versions again, published with these variables, so a revoked key stops working now
    # (and the verify stage's one-off key works while a private deployment's first version deploys).
    root = Deployment.objects.get(pk=deployment.root.pk)
    if get_alias(lam, root) is not None:
        route(root, lam)
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
    once and revokes costs two configuration updates instead.

    A version (verified before it serves) is published again with the key, called, and
    published once more without it, so the Lambda version recorded for it never knew it."""
    root = deployment.root
    if not Deployment.objects.values_list("is_private", flat=True).get(pk=root.pk):
        yield {}, ""
        return
    key, raw = DeploymentKey.issue(deployment=root, name="ServeML verify (revoked after the call)")

    def apply_keys() -> None:
        if deployment.version_of_id:
            current_lambda_version(client("lambda"), deployment)  # publishes it again: the keys changed
        else:
            update_access(deployment)

    try:
        apply_keys()
        yield {"Authorization": f"Bearer {raw}"}, " (private: with a one-off key, revoked after the call)"
    finally:
        key.revoke()
        apply_keys()


def verify_post(deployment: Deployment):
    """How the verify stage calls `deployment`: None (httpx.post to its URL), except for a version,
    which has no URL of its own until it is promoted (the alias serves only the promoted one):
    its Lambda version is invoked directly, with the event the HTTP API would send it."""
    if not deployment.version_of_id:
        return None

    def post(url: str, **request) -> httpx.Response:
        return invoke(deployment, request["json"], request.get("headers") or {})

    return post


def invoke(deployment: Deployment, body: dict, headers: dict) -> httpx.Response:
    """POST `body` to `deployment`'s Lambda version as API Gateway (payload 2.0) would; its answer."""
    event = {
        "version": "2.0",
        "rawPath": "/",
        "headers": {"content-type": "application/json", **{name.lower(): value for name, value in headers.items()}},
        "requestContext": {"http": {"method": "POST", "path": "/"}},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }
    number = deployment.lambda_version
    answer = call(
        client("lambda").invoke,
        f"invoke Lambda version {number}",
        FunctionName=resource_name(deployment),
        Qualifier=number,
        Payload=json.dumps(event).encode(),
    )
    payload = answer["Payload"].read()
    if answer.get("FunctionError"):
        return httpx.Response(502, content=payload)
    result = json.loads(payload)
    content = result.get("body") or ""
    content = base64.b64decode(content) if result.get("isBase64Encoded") else content.encode()
    return httpx.Response(result.get("statusCode", 502), content=content)


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


def ensure_integration(gateway, api_id: str, uri: str, *, replaces: str = "") -> tuple[str, bool]:
    """The integration invoking `uri` (the alias), and whether it invoked `replaces` until now: one
    invoking the bare function, as deployments made before versions reached aws do, is pointed at
    `uri` instead, in place, and its routes follow it at once."""
    found = items(gateway, "get_integrations", "list the HTTP API's integrations", ApiId=api_id)
    for item in found:
        if item.get("IntegrationUri") == uri:
            return item["IntegrationId"], False
    for item in found:
        if replaces and item.get("IntegrationUri") == replaces:
            call(
                gateway.update_integration,
                "point the HTTP API at the Lambda alias",
                ApiId=api_id,
                IntegrationId=item["IntegrationId"],
                IntegrationUri=uri,
            )
            return item["IntegrationId"], True
    created = call(
        gateway.create_integration,
        "connect the HTTP API to the function",
        ApiId=api_id,
        IntegrationType="AWS_PROXY",
        IntegrationUri=uri,
        IntegrationMethod="POST",
        PayloadFormatVersion="2.0",
    )
    return created["IntegrationId"], False


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
    """Let the HTTP API invoke the alias (an alias has its own policy: the function's does not cover it)."""
    name = resource_name(deployment)
    found = call(
        lam.get_policy,
        "read the Lambda alias's policy",
        ignore=("ResourceNotFoundException",),
        FunctionName=name,
        Qualifier=ALIAS,
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
        Qualifier=ALIAS,
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


# ------------------------------------------------------------------ Lambda versions and the alias


def _update(lam, method, doing: str, name: str, **kwargs) -> None:
    """Update the function and wait for it; another update still running is a retry, not a failure."""
    if call(method, doing, ignore=("ResourceConflictException",), FunctionName=name, **kwargs) is None:
        raise TransientStageError(f"the Lambda function {name} is still applying an earlier update")
    _wait(lam, "function_updated_v2", name)


def publish(lam, deployment: Deployment) -> str:
    """Publish `deployment`'s image (a root's or a version's) as a Lambda version of its
    deployment's function, with the deployment's keys as they are now; record its number.

    Lambda publishes nothing new when neither code nor configuration changed since the
    last version, and answers that one: a rerun after an interruption publishes nothing."""
    name = resource_name(deployment)
    found = call(lam.get_function, "read the Lambda function", FunctionName=name)
    if found["Code"].get("ImageUri") != deployment.image_uri:
        _update(
            lam,
            lam.update_function_code,
            "update the Lambda function's image",
            name,
            ImageUri=deployment.image_uri,
            Architectures=[settings.SERVEML_LAMBDA_ARCHITECTURE],
        )
    current = found["Configuration"].get("Environment", {}).get("Variables", {})
    variables = function_environment(deployment, current)
    if variables != current:
        _update(
            lam,
            lam.update_function_configuration,
            "set the Lambda function's keys",
            name,
            Environment={"Variables": variables},
        )
    label = f"ServeML version {deployment.version}"
    number = call(lam.publish_version, "publish a Lambda version", FunctionName=name, Description=label)["Version"]
    # Another version's pipeline (or a change of keys) may have changed the image in between.
    published = call(lam.get_function, "read the published Lambda version", FunctionName=name, Qualifier=number)
    if published["Code"].get("ImageUri") != deployment.image_uri:
        raise TransientStageError(
            f"another change of the Lambda function {name} (a version, or its keys) came while version "
            f"{deployment.version} was published"
        )
    # A version's ARN names its Lambda version (the admin shows it): the one published last.
    arn = {"function_arn": f"{deployment.root.function_arn}:{number}"} if deployment.version_of_id else {}
    deployment.update(lambda_version=number, **arn)
    return number


def current_lambda_version(lam, deployment: Deployment) -> str:
    """`deployment`'s Lambda version, published again when the keys and privacy it carries are not
    the deployment's now: an alias must never serve a version that still takes a revoked key."""
    number = deployment.lambda_version
    if number:
        found = call(
            lam.get_function,
            f"read Lambda version {number}",
            ignore=("ResourceNotFoundException",),
            FunctionName=resource_name(deployment),
            Qualifier=number,
        )
        carried = (found or {}).get("Configuration", {}).get("Environment", {}).get("Variables", {})
        held = {name: carried[name] for name in ACCESS_VARIABLES if name in carried}
        if found and held == access_variables(deployment):
            return number
    return publish(lam, deployment)


def get_alias(lam, root: Deployment) -> dict | None:
    return call(
        lam.get_alias,
        f"look up the Lambda alias {ALIAS}",
        ignore=("ResourceNotFoundException",),
        FunctionName=resource_name(root),
        Name=ALIAS,
    )


def ensure_alias(lam, gateway, root: Deployment, number: str) -> bool:
    """The alias (created at Lambda version `number` if missing), its invoke permission, and the
    HTTP API invoking it; True when the alias was missing. A deployment made before versions reached
    aws invokes the bare function: its integration is pointed at the alias, created at what it serves."""
    created = get_alias(lam, root) is None
    if created:
        call(  # a conflict: an interrupted run created it meanwhile
            lam.create_alias,
            f"create the Lambda alias {ALIAS}",
            ignore=("ResourceConflictException",),
            FunctionName=resource_name(root),
            Name=ALIAS,
            FunctionVersion=number,
            Description="what the HTTP API invokes: ServeML moves it on promote and rollback",
        )
    ensure_permission(lam, root, root.api_id)  # before the API invokes the alias
    _, moved = ensure_integration(gateway, root.api_id, alias_arn(root), replaces=root.function_arn)
    if moved:
        root.record_event(
            stage="",
            message=f"its HTTP API now invokes the Lambda alias {ALIAS}, which serves what the function served: "
            "promote and rollback move the alias, and its URL stays the same",
        )
    return created


def undeleted_versions(root: Deployment):
    """The deployment and those of its versions not deleted: what may still use its Lambda versions and images."""
    return Deployment.objects.filter(Q(pk=root.pk) | Q(version_of=root), deleted_at__isnull=True)


def route(root: Deployment, lam=None) -> str:
    """Point the alias at the version `root` serves, with the canary's share if one runs: one
    update_alias, atomic, and the URL never changes. Each one published again first if its keys
    are stale. Raises StageError / TransientStageError; says what it now serves."""
    lam = lam or client("lambda")
    for attempt in range(2):
        serving = current_lambda_version(lam, root.serving_version())
        weights = {}
        if root.canary_id and root.canary_percent:
            canary = current_lambda_version(lam, root.canary)
            if canary != serving:  # the same image and keys: one Lambda version, nothing to split
                weights[canary] = round(root.canary_percent / 100, 2)
        ensure_alias(lam, client("apigatewayv2"), root, serving)  # gone or never made: make it
        moved = call(
            lam.update_alias,
            f"move the Lambda alias {ALIAS}",
            ignore=() if attempt else ("ResourceNotFoundException",),
            FunctionName=resource_name(root),
            Name=ALIAS,
            FunctionVersion=serving,
            RoutingConfig={"AdditionalVersionWeights": weights},
        )
        if moved is not None:
            break
        # A change of keys published one of them again, and pruned the number read here, between
        # that read and this move: read the rows again (once; a second miss is an error).
        root = Deployment.objects.get(pk=root.pk)
    split = f", Lambda version {canary} {root.canary_percent}%" if weights else ""
    pruned = prune(lam, root, {serving, *weights})
    return f"the Lambda alias {ALIAS} serves Lambda version {serving}{split}" + (f"; {pruned}" if pruned else "")


MAX_PRUNED = 5  # per move of the alias: it runs inside the request (promote) that moved it


def prune(lam, root: Deployment, routed: set[str]) -> str:
    """Delete the Lambda versions of `root`'s function that nothing can use any more: published
    again with the keys of now (current_lambda_version, a private version's verify), so no ServeML
    version records them, and not `routed` (what the alias serves). Each carries the key digests
    of its day. A version younger than SERVEML_LAMBDA_PRUNE_AFTER_S is kept: its pipeline may not
    have recorded it yet. At most MAX_PRUNED at a time (in the order Lambda lists them), the rest
    with the next moves. Best effort, never failing what called it: says what it deleted, and what
    it kept and why."""
    deleted, kept = [], []
    try:
        recorded = set(undeleted_versions(root).exclude(lambda_version="").values_list("lambda_version", flat=True))
        before = datetime.now(UTC) - timedelta(seconds=settings.SERVEML_LAMBDA_PRUNE_AFTER_S)
        stale = [
            listed["Version"]
            for listed in listed_versions(lam, resource_name(root))
            if listed["Version"] not in recorded | routed and modified_at(listed.get("LastModified", "")) < before
        ]
        for number in stale[:MAX_PRUNED]:
            try:
                call(
                    lam.delete_function,
                    f"delete the superseded Lambda version {number}",
                    ignore=("ResourceNotFoundException",),
                    FunctionName=resource_name(root),
                    Qualifier=number,
                )
                deleted.append(number)
            except StageError as exc:  # one AWS will not delete (an operator's alias on it, say)
                kept.append(f"{number} ({exc})")
    except Exception as exc:  # the alias has moved: nothing here may undo that
        log.exception("%s: superseded Lambda versions were not looked at", root.public_id)
        kept.append(f"all: {exc}")
    said = [f"deleted the superseded Lambda version(s) {', '.join(deleted)}"] if deleted else []
    if kept:
        log.warning("%s: superseded Lambda versions kept: %s", root.public_id, "; ".join(kept))
        said.append(f"superseded Lambda versions kept: {'; '.join(kept)}")
    return "; ".join(said)


def provision(deployment: Deployment) -> str:
    if deployment.version_of_id:
        return provision_version(deployment)
    lam, gateway = client("lambda"), client("apigatewayv2")
    function_arn, applied = ensure_function(lam, deployment)
    deployment.update(function_arn=function_arn)
    number = publish(lam, deployment)
    api = ensure_api(gateway, deployment)
    deployment.update(api_id=api["ApiId"])
    if not ensure_alias(lam, gateway, deployment, number):  # a rerun, or a redeploy: serve this image
        call(
            lam.update_alias,
            f"move the Lambda alias {ALIAS}",
            FunctionName=resource_name(deployment),
            Name=ALIAS,
            FunctionVersion=number,
            RoutingConfig={"AdditionalVersionWeights": {}},
        )
    integration_id, _ = ensure_integration(gateway, api["ApiId"], alias_arn(deployment))
    ensure_route(gateway, api["ApiId"], integration_id)
    ensure_stage(gateway, api["ApiId"])
    # Keys or privacy changed while the function was being created: the access task may have
    # found no function_arn yet and left it to this stage, so apply what the owner set since.
    if access_variables(deployment) != applied:
        update_access(deployment, lam)
    deployment.update(endpoint_url=f"{api['ApiEndpoint'].rstrip('/')}/")
    return (
        f"Lambda function {resource_name(deployment)} ({settings.SERVEML_LAMBDA_MEMORY_MB} MB, "
        f"{settings.SERVEML_LAMBDA_TIMEOUT_S} s, {settings.SERVEML_LAMBDA_ARCHITECTURE}), version {number} "
        f"behind its alias {ALIAS}, invoked by HTTP API {api['ApiId']}"
    )


def provision_version(version: Deployment) -> str:
    """Publish a version's image as a Lambda version of its deployment's function. Nothing routes
    to it until it is promoted (or a canary): the alias keeps serving what it served."""
    root = Deployment.objects.get(pk=version.version_of_id)
    lam = client("lambda")
    # Before the function's code changes: a deployment still invoking the bare function moves
    # onto the alias first, or this version's image would answer its URL unpromoted.
    ensure_alias(lam, client("apigatewayv2"), root, current_lambda_version(lam, root.serving_version()))
    number = publish(lam, version)  # which records its qualified ARN too
    return (
        f"Lambda version {number} of {resource_name(root)}; the alias {ALIAS} serves version "
        f"{root.serving_version().version} until this one is promoted"
    )


def teardown(deployment: Deployment) -> str:
    """Delete the API, the alias, the function (its published versions with it) and the
    repository; say what was deleted. A version owns nothing apart but its Lambda version: it goes
    with its deployment's function, or alone when the version is deleted (delete_version)."""
    if deployment.version_of_id:
        if deployment.is_deleted():
            return delete_version(deployment)
        number = deployment.lambda_version
        return f"Lambda version {number} was deleted with the function" if number else "nothing of its own on AWS"
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
    delete(f"Lambda alias {ALIAS}", lam.delete_alias, "ResourceNotFoundException", FunctionName=function, Name=ALIAS)
    published = published_versions(lam, function)
    delete(f"Lambda function {function}", lam.delete_function, "ResourceNotFoundException", FunctionName=function)
    if published and deleted and deleted[-1].startswith("Lambda function"):
        deleted[-1] += f" with its {len(published)} published version(s)"
    repository = repository_name(deployment)
    delete(
        f"ECR repository {repository}",
        ecr.delete_repository,
        "RepositoryNotFoundException",
        repositoryName=repository,
        force=True,
    )
    return "deleted " + ", ".join(deleted) if deleted else "nothing was left on AWS to delete"


def delete_version(version: Deployment) -> str:
    """Delete a deleted version's Lambda version, unless something still uses it: the alias (what
    serves, or a canary's share; AWS refuses to delete those anyway), or another version of the
    deployment published as the same Lambda version (Lambda publishes nothing new for the same image
    and keys). Then its image, unless another version uses it (unused_image)."""
    number = version.lambda_version
    if not number:
        return "it had no Lambda version"
    root = version.root
    sharing = undeleted_versions(root).filter(lambda_version=number).exclude(pk=version.pk).first()
    if sharing is not None:
        return f"Lambda version {number} kept: version {sharing.version} is the same Lambda version"
    lam = client("lambda")
    found = get_alias(lam, root)
    if found:
        weights = (found.get("RoutingConfig") or {}).get("AdditionalVersionWeights") or {}
        if number == found["FunctionVersion"] or number in weights:
            return f"Lambda version {number} kept: the alias {ALIAS} still sends requests to it"
    deleted = call(
        lam.delete_function,
        f"delete Lambda version {number}",
        ignore=("ResourceNotFoundException",),
        FunctionName=resource_name(version),
        Qualifier=number,
    )
    said = f"deleted Lambda version {number}" if deleted is not None else f"Lambda version {number} was gone already"
    try:
        return f"{said}; {unused_image(lam, version, root)}"
    except StageError as exc:  # the version is gone from Lambda: its image is only storage
        log.warning("%s: its image was not deleted: %s", version.public_id, exc)
        return f"{said}; its image kept: {exc}"


def image_id(image_uri: str, repository: str) -> dict | None:
    """ECR's imageId for an image of `repository` as push() records it (`<registry>/<repository>@sha256:...`
    or `<registry>/<repository>:<tag>`); None for anything else, which is none of ours to delete."""
    name, at, digest = image_uri.partition("@")
    if not at:
        name, colon, tag = image_uri.rpartition(":")
        if not colon or "/" in tag:
            return None
    if not name.endswith(f"/{repository}"):
        return None
    return {"imageDigest": digest} if at else {"imageTag": tag}


def unused_image(lam, version: Deployment, root: Deployment) -> str:
    """Delete a deleted version's image from the deployment's repository, unless the deployment or
    another of its versions uses the same image, or the function's $LATEST does (the next publish
    moves it). Images are compared by tag: push() tags each with a hash of its build inputs, and
    identical inputs are pushed once and recorded by that tag. Removing an image's last tag deletes
    it. Says what it did; an image gone already is no error."""
    ecr, repository = client("ecr"), repository_name(root)

    def tags_of(image_uri: str) -> set[str]:
        found = image_id(image_uri, repository)
        if found is None:
            return set()
        described = call(
            ecr.describe_images,
            "look up an image in the deployment's ECR repository",
            ignore=("ImageNotFoundException", "RepositoryNotFoundException"),
            repositoryName=repository,
            imageIds=[found],
        )
        return {tag for image in (described or {}).get("imageDetails", []) for tag in image.get("imageTags", [])}

    mine = tags_of(version.image_uri)
    if not mine:
        return "its image was gone already"
    others = undeleted_versions(root).exclude(pk=version.pk).exclude(image_uri="")
    for image_uri, number in dict(others.values_list("image_uri", "version")).items():  # each image once
        if mine & tags_of(image_uri):
            return f"its image kept: version {number} uses the same image"
    latest = call(lam.get_function, "read the Lambda function", FunctionName=resource_name(root))["Code"]
    if mine & tags_of(latest.get("ImageUri", "")):
        return "its image kept: the Lambda function's $LATEST names it until another version is published"
    call(
        ecr.batch_delete_image,
        "delete the version's image from the deployment's ECR repository",
        repositoryName=repository,
        imageIds=[{"imageTag": tag} for tag in sorted(mine)],
    )
    return f"deleted its image ({', '.join(tag[:12] + '…' for tag in sorted(mine))}) from {repository}"


LAST_MODIFIED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?$")


def modified_at(text: str) -> datetime:
    """A Lambda LastModified ("2019-02-23T20:58:27.497+0000"; "...000Z" from moto) as an aware
    datetime; one it cannot read counts as now, so nothing is deleted for a misread date."""
    found = LAST_MODIFIED.match(text)
    if found is None:
        return datetime.now(UTC)
    when, zone = found.groups()
    zone = "+0000" if zone in (None, "Z") else zone.replace(":", "")
    return datetime.strptime(when + zone, "%Y-%m-%dT%H:%M:%S%z")


def published_versions(lam, function: str) -> list[str]:
    """The function's published version numbers ($LATEST is not one); none when it is gone."""
    return [listed["Version"] for listed in listed_versions(lam, function)]


def listed_versions(lam, function: str) -> list[dict]:
    """The function's published versions as list_versions_by_function describes them, without
    $LATEST; none when the function is gone."""
    pages = lam.get_paginator("list_versions_by_function").paginate(FunctionName=function)
    listed = call(
        lambda: [version for page in pages for version in page["Versions"]],
        "list the Lambda function's versions",
        ignore=("ResourceNotFoundException",),
    )
    return [version for version in listed or [] if version["Version"] != "$LATEST"]


# ------------------------------------------------------------------ figures from CloudWatch

# Lambda's own metrics (namespace AWS/Lambda). Percentiles are left out: CloudWatch keeps them,
# but the average and maximum say enough beside the link to the function's Monitoring tab.
METRICS = (
    ("invocations", "Invocations", "Sum"),
    ("errors", "Errors", "Sum"),
    ("duration_avg_ms", "Duration", "Average"),
    ("duration_max_ms", "Duration", "Maximum"),
)
FIGURES_CONFIG = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=3)


def figures(root: Deployment, versions: list[Deployment], *, hours: int = 1) -> dict:
    """Invocations, errors and duration over the last `hours`, from CloudWatch: `total` for the
    function (every request its URL answered), and `versions`, keyed by ServeML version number,
    for each of `versions` that has a Lambda version: what the alias sent it (Lambda's
    ExecutedVersion dimension; a version published again for new keys counts from then).

    For a page view: one call, no retry, a few seconds at most. Raises StageError with
    what went wrong (the page then says where the figures are)."""
    name = resource_name(root)
    scopes = {"total": [{"Name": "FunctionName", "Value": name}]}
    for version in versions:
        if version.lambda_version:
            scopes[f"v{version.version}"] = [
                {"Name": "FunctionName", "Value": name},
                {"Name": "Resource", "Value": f"{name}:{ALIAS}"},
                {"Name": "ExecutedVersion", "Value": version.lambda_version},
            ]
    queries = [
        {
            "Id": f"{scope}_{key}",
            "MetricStat": {
                "Metric": {"Namespace": "AWS/Lambda", "MetricName": metric, "Dimensions": dimensions},
                "Period": hours * 3600,
                "Stat": stat,
            },
        }
        for scope, dimensions in scopes.items()
        for key, metric, stat in METRICS
    ]
    cloudwatch = boto3.client("cloudwatch", region_name=settings.SERVEML_AWS_REGION, config=FIGURES_CONFIG)
    end = datetime.now(UTC)
    answer = call(
        cloudwatch.get_metric_data,
        "read the function's metrics from CloudWatch",
        MetricDataQueries=queries,
        StartTime=end - timedelta(hours=hours),
        EndTime=end,
    )
    found = {result["Id"]: result["Values"] for result in answer["MetricDataResults"]}
    summed = {scope: _summary({key: found.get(f"{scope}_{key}") or [] for key, *_ in METRICS}) for scope in scopes}
    total = summed.pop("total")
    return {"hours": hours, "total": total, "versions": {int(scope[1:]): row for scope, row in summed.items()}}


def _summary(values: dict[str, list[float]]) -> dict:
    """One scope's figures from its values (the window may straddle two periods: summed, the
    mean of the averages, the larger peak)."""
    invocations, errors = sum(values["invocations"]), sum(values["errors"])
    averages, peaks = values["duration_avg_ms"], values["duration_max_ms"]
    return {
        "invocations": int(invocations),
        "errors": int(errors),
        "error_rate": errors / invocations * 100 if invocations else None,
        "duration_avg_ms": sum(averages) / len(averages) if averages else None,
        "duration_max_ms": max(peaks) if peaks else None,
    }
