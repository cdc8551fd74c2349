"""Writes that change deployments. Views, the API, the admin and the pipeline go through here."""

import hashlib
import logging
import secrets
from datetime import timedelta

from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.utils import timezone

from deployments.models import Deployment, DeploymentEvent, DeploymentKey

log = logging.getLogger(__name__)
# A claim older than this is considered abandoned (the worker died mid-deploy),
# so a redelivered task may take the deployment over.
CLAIM_LEASE = timedelta(hours=1)


def _sha256(upload: UploadedFile) -> str:
    digest = hashlib.sha256()
    for chunk in upload.chunks():
        digest.update(chunk)
    upload.seek(0)
    return digest.hexdigest()


def _enqueue(deployment: Deployment) -> None:
    from deployments.tasks import deploy

    transaction.on_commit(lambda: deploy.delay(deployment.pk))


@transaction.atomic
def deployment_create(
    *, owner, name: str, target: str, model_format: str, model_upload: UploadedFile, requirements_upload: UploadedFile
) -> Deployment:
    """Store a validated upload under server-generated names and queue its pipeline."""
    deployment = Deployment(
        owner=owner,
        name=name,
        target=target,
        model_format=model_format,
        model_filename=display_name(model_upload.name),
        requirements_filename=display_name(requirements_upload.name),
        model_sha256=_sha256(model_upload),
    )
    # upload_to ignores the client's file name; it only sees the deployment's id.
    deployment.model_file.save("model", model_upload, save=False)
    deployment.requirements_file.save("requirements.txt", requirements_upload, save=False)
    deployment.save()
    deployment_record_event(deployment=deployment, stage="", message=f"queued for the {target} target")
    _enqueue(deployment)
    return deployment


def display_name(name: str | None) -> str:
    name = (name or "").replace("\x00", "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:255] or "upload"


def deployment_record_event(
    *, deployment: Deployment, stage: str, message: str, level: str = "info", duration_ms: int | None = None
) -> DeploymentEvent:
    return DeploymentEvent.objects.create(
        deployment=deployment, stage=stage, level=level, message=message, duration_ms=duration_ms
    )


def deployment_claim(*, deployment_id: int) -> Deployment | None:
    """Atomically move a queued deployment to deploying; None if another task has it."""
    now = timezone.now()
    claimed = Deployment.objects.filter(pk=deployment_id, status=Deployment.Status.QUEUED).update(
        status=Deployment.Status.DEPLOYING, claimed_at=now, error=""
    ) or Deployment.objects.filter(
        pk=deployment_id, status=Deployment.Status.DEPLOYING, claimed_at__lt=now - CLAIM_LEASE
    ).update(claimed_at=now)
    if not claimed:
        return None
    return Deployment.objects.get(pk=deployment_id)


def deployment_update(*, deployment: Deployment, **fields) -> None:
    for name, value in fields.items():
        setattr(deployment, name, value)
    deployment.save(update_fields=[*fields, "updated_at"])


def deployment_set_stage(*, deployment: Deployment, stage: str) -> None:
    deployment_update(deployment=deployment, stage=stage)


@transaction.atomic
def deployment_fail(*, deployment: Deployment, stage: str, message: str, duration_ms: int | None = None) -> None:
    deployment_update(deployment=deployment, status=Deployment.Status.FAILED, error=message)
    deployment_record_event(deployment=deployment, stage=stage, level="error", message=message, duration_ms=duration_ms)


@transaction.atomic
def deployment_mark_ready(*, deployment: Deployment) -> None:
    deployment_update(deployment=deployment, status=Deployment.Status.READY, ready_at=timezone.now())
    deployment_record_event(deployment=deployment, stage="", message=f"ready: {deployment.endpoint_url}")


def deployment_requeue(*, deployment: Deployment, reason: str) -> None:
    """Hand a deployment back to the queue after a transient error; the task retries it."""
    deployment_update(deployment=deployment, status=Deployment.Status.QUEUED)
    deployment_record_event(deployment=deployment, stage=deployment.stage, level="warning", message=reason)


def deployment_request_stop(*, deployment: Deployment) -> str:
    """Stop a deployment as its target allows, and say what happened.

    Local: at once (the runtime unloads it). AWS: the deployment becomes `stopping`
    and a task deletes its API, function and repository, which takes AWS seconds
    and may need retries: no web request waits on it. Raises StageError only for
    a local stop that failed.
    """
    if deployment.target == Deployment.Target.LOCAL:
        return deployment_stop(deployment=deployment)
    from deployments.tasks import stop

    with transaction.atomic():
        # Conditional, so two clicks queue one teardown.
        moved = Deployment.objects.filter(
            pk=deployment.pk, status__in=[Deployment.Status.READY, Deployment.Status.FAILED]
        ).update(status=Deployment.Status.STOPPING, updated_at=timezone.now())
        if moved:
            deployment.status = Deployment.Status.STOPPING
            deployment_record_event(
                deployment=deployment, stage="", message="stop requested: deleting its AWS resources"
            )
            transaction.on_commit(lambda: stop.delay(deployment.pk))
    return "its AWS resources are being deleted; its page shows when that is done"


@transaction.atomic
def deployment_stop_failed(*, deployment: Deployment, message: str) -> None:
    """The teardown gave up: the deployment shows why, and can be stopped again."""
    error = f"Stopping failed: {message} Some of its AWS resources may remain; stop it again once this is fixed."
    deployment_update(deployment=deployment, status=Deployment.Status.FAILED, stage=Deployment.Stage.TEARDOWN,
                      error=error)
    deployment_record_event(deployment=deployment, stage=Deployment.Stage.TEARDOWN, level="error", message=error)


def deployment_stop(*, deployment: Deployment) -> str:
    """Tear down what serves the deployment, then mark it stopped.

    Raises StageError (with what to fix) when the cloud refuses to delete
    something; the deployment then keeps its status so the stop can be retried.
    """
    from deployments.pipeline import aws, local

    if deployment.target == Deployment.Target.AWS:
        summary = aws.teardown(deployment)
    else:
        summary = local.teardown(deployment)
    with transaction.atomic():
        deployment_update(deployment=deployment, status=Deployment.Status.STOPPED, stopped_at=timezone.now())
        deployment_record_event(deployment=deployment, stage="", message=f"stopped: {summary}")
    return summary


@transaction.atomic
def deployment_redeploy(*, deployment: Deployment) -> None:
    """Run the whole pipeline again from the stored files (operators, from the admin).

    The runtime drops the old build after the commit: its HTTP call may hang for its
    whole timeout, and must not hold the transaction (and the row's locks) meanwhile.
    Callbacks run in order, so it is done before the task is sent, and by then the row
    reads `queued`, which the runtime neither serves nor loads again."""
    from deployments.pipeline import local

    if deployment.status in (Deployment.Status.DEPLOYING, Deployment.Status.STOPPING):
        return  # a task owns it
    deployment_update(
        deployment=deployment, status=Deployment.Status.QUEUED, stage="", error="", endpoint_url="",
        claimed_at=None, ready_at=None, stopped_at=None,
    )
    deployment_record_event(deployment=deployment, stage="", message="redeploy requested")
    if deployment.target == Deployment.Target.LOCAL:
        # robust: whatever the runtime does, the task below is still sent.
        transaction.on_commit(lambda: local.teardown(deployment), robust=True)
    _enqueue(deployment)


def key_digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


class KeyRefused(Exception):
    """A key cannot be created; the message says why and what to do instead."""


def _access_changed(deployment: Deployment, *, pending: str) -> None:
    """Tell what serves the deployment about a change of keys or privacy.

    Local: the runtime re-reads them now (its sweep does anyway). AWS: the Lambda
    function's environment holds them, and changing it is an AWS call that may need
    retries, so a task does it after the commit, never the web request. Until the
    task says it is done, the event log says it is pending (`pending`), not done.
    """
    from deployments.runtime import client
    from deployments.tasks import sync_access

    if deployment.target == Deployment.Target.LOCAL:
        transaction.on_commit(lambda: client.refresh_quietly(deployment.public_id))
        return
    if deployment.status in (Deployment.Status.STOPPING, Deployment.Status.STOPPED):
        return  # its function is gone or going
    if deployment.function_arn:
        deployment_record_event(deployment=deployment, stage="", message=f"updating the Lambda function: {pending}")
    # Queued even before the function exists: the task then leaves it to the provision
    # stage, which applies the keys it finds (see aws.provision), so no change is lost.
    transaction.on_commit(lambda: sync_access.delay(deployment.pk))


def _key_new(deployment: Deployment, name: str) -> tuple[DeploymentKey, str]:
    raw = DeploymentKey.PREFIX + secrets.token_urlsafe(32)
    key = DeploymentKey.objects.create(
        deployment=deployment, name=name.strip()[:100] or "key", hint=raw[:10], key_sha256=key_digest(raw)
    )
    return key, raw


@transaction.atomic
def deployment_key_create(*, deployment: Deployment, name: str) -> tuple[DeploymentKey, str]:
    """Create an API key; returns the row and the key itself, which is never stored or shown again.

    Raises KeyRefused when an aws deployment already has as many keys as its
    function's environment can hold."""
    from deployments.pipeline import aws

    # One key creation per deployment at a time, so the limit and the first-key rule hold
    # when two requests race; then read the row as it is now, not as the caller loaded it.
    Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    deployment.refresh_from_db(fields=["is_private", "status", "function_arn"])
    active = deployment.active_keys().count()
    if deployment.target == Deployment.Target.AWS and active >= aws.MAX_KEYS:
        raise KeyRefused(
            f"This deployment already has {active} active API keys, the most an AWS Lambda function can hold "
            "(its environment is limited to 4 KB). Revoke keys that are no longer used, then create this one."
        )
    key, raw = _key_new(deployment, name)
    if not active and not deployment.is_private:
        # A deployment with keys is private unless its owner says otherwise.
        deployment_update(deployment=deployment, is_private=True)
    deployment_record_event(deployment=deployment, stage="", message=f"API key {key} created")
    made_private = not active and deployment.is_private
    _access_changed(deployment, pending=(
        f"it will need an API key such as {key} once that is done; until then it still answers without one"
        if made_private else f"key {key} works once that is done"
    ))
    return key, raw


@transaction.atomic
def deployment_key_revoke(*, key: DeploymentKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        deployment_record_event(deployment=key.deployment, stage="", message=f"API key {key} revoked")
        _access_changed(key.deployment, pending=f"until that is done, calls with key {key} may still be answered")


@transaction.atomic
def deployment_set_private(*, deployment: Deployment, private: bool) -> None:
    deployment_update(deployment=deployment, is_private=private)
    if deployment.target == Deployment.Target.AWS and deployment.function_arn:
        # Not yet true on AWS: the next event says so, and the task's says when it is.
        message = "endpoint set to private" if private else "endpoint set to public"
    else:
        message = "endpoint is private: calls need an API key" if private else "endpoint is public"
    deployment_record_event(deployment=deployment, stage="", message=message)
    _access_changed(deployment, pending=(
        "until that is done, it still answers calls without a key" if private
        else "until that is done, calls without a key are still refused"
    ))


def deployment_access_sync(*, deployment: Deployment) -> None:
    """Apply the deployment's privacy and keys to its Lambda function (the sync_access task).

    Raises TransientStageError (retry) or StageError (give up) as the AWS calls do."""
    from deployments.pipeline import aws

    if deployment.target != Deployment.Target.AWS or not deployment.function_arn:
        return  # no function yet: the provision stage applies the keys when it creates it
    if deployment.status in (Deployment.Status.STOPPING, Deployment.Status.STOPPED):
        return
    summary = aws.update_access(deployment)
    deployment_record_event(deployment=deployment, stage="", message=summary)


def deployment_access_sync_failed(*, deployment: Deployment, message: str) -> None:
    deployment_record_event(
        deployment=deployment, stage="", level="error",
        message=(
            f"Updating the Lambda function's keys failed: {message.rstrip('.')}. The function may not reflect "
            "the latest change of keys or privacy. To retry, switch the endpoint between public and private again (or "
            "create or revoke a key) once this is fixed; an operator can also redeploy it."
        ),
    )


@transaction.atomic
def deployment_verify_key_create(*, deployment: Deployment) -> tuple[DeploymentKey, str]:
    """A key for the verify stage's one call to a private aws endpoint; revoked right after it.

    No event and no access task: the verify stage applies it to the function itself."""
    return _key_new(deployment, "ServeML verify (revoked after the call)")


def deployment_verify_key_revoke(*, key: DeploymentKey) -> None:
    DeploymentKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
