"""Writes that change deployments. Views, the API, the admin and the pipeline go through here."""

import hashlib
import logging
import shutil
import uuid
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from deployments import builds, targets
from deployments.models import Deployment, DeploymentEvent, DeploymentKey
from deployments.pipeline.errors import StageError
from deployments.runtime import client

log = logging.getLogger(__name__)
Status = Deployment.Status


class ClaimLost(Exception):
    """This task's lease expired and the deployment was handed to another: it must stop, writing nothing."""


def _sha256(upload: UploadedFile) -> str:
    digest = hashlib.sha256()
    for chunk in upload.chunks():
        digest.update(chunk)
    upload.seek(0)
    return digest.hexdigest()


def _lease() -> timedelta:
    return timedelta(seconds=settings.SERVEML_CLAIM_LEASE_S)


def _enqueue(deployment: Deployment) -> None:
    """Run the pipeline from its first stage once the transaction commits (a new upload, a redeploy)."""
    deployment_update(
        deployment=deployment,
        completed_stages=[],
        claim_token="",
        lease_expires_at=None,
        interruptions=0,
        enqueued_at=None,
    )
    transaction.on_commit(lambda: _send(deployment.pk, "deploy"))


def _task(name: str):
    """A task of deployments.tasks, found by its name: tasks import services, so services
    never import tasks (DeploymentsConfig.ready registers them in every process)."""
    return current_app.tasks[f"deployments.tasks.{name}"]


def _send(deployment_id: int, task_name: str, *, quiet: bool = False) -> bool:
    """Hand a deployment's task to the broker; False when the broker cannot take it.

    The row is already stored, so an upload is never lost to a broker that is down:
    its `enqueued_at` stays empty, and the reaper sends it again once the broker is back."""
    try:
        _task(task_name).delay(deployment_id)
    except BrokerUnavailable as exc:
        log.warning("could not send %s of deployment %s to the broker: %s", task_name, deployment_id, exc)
        Deployment.objects.filter(pk=deployment_id).update(enqueued_at=None)
        if not quiet:
            what = "queued" if task_name == "deploy" else "teardown queued"
            DeploymentEvent.objects.create(
                deployment_id=deployment_id,
                stage="",
                level="warning",
                message=(
                    f"{what}; will start when the broker is back (Redis did not answer). Nothing is lost: "
                    "ServeML sends it to a worker as soon as the broker answers again."
                ),
            )
        return False
    Deployment.objects.filter(pk=deployment_id).update(enqueued_at=timezone.now())
    return True


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
    )
    _store_upload(deployment, model_upload, requirements_upload)
    deployment_record_event(deployment=deployment, stage="", message=f"queued for the {target} target")
    _enqueue(deployment)
    return deployment


def _store_upload(deployment: Deployment, model_upload: UploadedFile, requirements_upload: UploadedFile) -> None:
    """Store a new deployment's (or version's) files and save its row."""
    deployment.model_filename = display_name(model_upload.name)
    deployment.requirements_filename = display_name(requirements_upload.name)
    deployment.model_sha256 = _sha256(model_upload)
    # upload_to ignores the client's file name; it only sees the deployment's id.
    deployment.model_file.save("model", model_upload, save=False)
    deployment.requirements_file.save("requirements.txt", requirements_upload, save=False)
    deployment.save()


def display_name(name: str | None) -> str:
    name = (name or "").replace("\x00", "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:255] or "upload"


def deployment_record_event(
    *, deployment: Deployment, stage: str, message: str, level: str = "info", duration_ms: int | None = None
) -> DeploymentEvent:
    return deployment.record_event(stage=stage, level=level, message=message, duration_ms=duration_ms)


def deployment_claim(*, deployment_id: int, token: str) -> Deployment | None:
    """Take a queued deployment for the pipeline; None if another task has it or it is not queued.

    Atomic and conditional, so of two tasks for one deployment (a redelivery, a re-send by
    the reaper) exactly one runs it. The winner holds a lease that its heartbeat renews
    (deployment_renew_claim); a deployment whose lease expired (its worker died) is first
    handed back to the queue, as the reaper would, so this task can resume it at once."""
    now = timezone.now()
    stale = Deployment.objects.filter(_expired(now), pk=deployment_id, status=Status.DEPLOYING).first()
    if stale is not None:
        _take_back(stale, now, resend=False)  # this task is the one that resumes it
    claimed = Deployment.objects.filter(pk=deployment_id, status=Status.QUEUED).update(
        status=Status.DEPLOYING, claim_token=token, lease_expires_at=now + _lease(), claimed_at=now, error=""
    )
    return Deployment.objects.get(pk=deployment_id) if claimed else None


def deployment_claim_stop(*, deployment_id: int, token: str) -> Deployment | None:
    """Take a stopping deployment for its teardown, as deployment_claim does for the pipeline."""
    now = timezone.now()
    stale = Deployment.objects.filter(_expired(now), pk=deployment_id, status=Status.STOPPING).first()
    if stale is not None:
        _take_back(stale, now, resend=False)
    claimed = Deployment.objects.filter(pk=deployment_id, status=Status.STOPPING, claim_token="").update(
        claim_token=token, lease_expires_at=now + _lease(), claimed_at=now
    )
    return Deployment.objects.get(pk=deployment_id) if claimed else None


def deployment_renew_claim(*, deployment_id: int, token: str) -> bool:
    """Extend the lease of the task holding `token` (its heartbeat); False once it is not the holder."""
    return bool(
        Deployment.objects.filter(
            pk=deployment_id, claim_token=token, status__in=[Status.DEPLOYING, Status.STOPPING]
        ).update(lease_expires_at=timezone.now() + _lease())
    )


def deployment_release_claim(*, deployment_id: int, token: str) -> None:
    """A task that stops without finishing lets its lease lapse now, so the reaper need not wait for it."""
    Deployment.objects.filter(pk=deployment_id, claim_token=token).update(lease_expires_at=timezone.now())


def _held(deployment: Deployment, token: str, *statuses: str):
    """The deployment's row, if the task holding `token` still has it."""
    return Deployment.objects.filter(pk=deployment.pk, claim_token=token, status__in=statuses or [Status.DEPLOYING])


def deployment_update(*, deployment: Deployment, **fields) -> None:
    deployment.update(**fields)


def deployment_set_stage(*, deployment: Deployment, stage: str, token: str) -> None:
    if not _held(deployment, token).update(stage=stage, updated_at=timezone.now()):
        raise ClaimLost(deployment.pk)
    deployment.stage = stage


@transaction.atomic
def deployment_complete_stage(
    *, deployment: Deployment, stage: str, token: str, message: str, duration_ms: int | None = None
) -> None:
    """Record a stage as done, with its event: a task that takes the deployment over starts after it."""
    completed = [*deployment.completed_stages, stage]
    if not _held(deployment, token).update(completed_stages=completed, updated_at=timezone.now()):
        raise ClaimLost(deployment.pk)
    deployment.completed_stages = completed
    deployment_record_event(deployment=deployment, stage=stage, message=message, duration_ms=duration_ms)


@transaction.atomic
def deployment_fail(
    *, deployment: Deployment, stage: str, message: str, duration_ms: int | None = None, token: str | None = None
) -> None:
    """Fail the deployment with a message for the user; with `token`, only while that task holds it."""
    if token is not None and not _held(deployment, token).select_for_update().exists():
        raise ClaimLost(deployment.pk)
    deployment_update(deployment=deployment, status=Status.FAILED, error=message, claim_token="", lease_expires_at=None)
    deployment_record_event(deployment=deployment, stage=stage, level="error", message=message, duration_ms=duration_ms)


@transaction.atomic
def deployment_mark_ready(*, deployment: Deployment, token: str) -> None:
    if not _held(deployment, token).update(
        status=Status.READY, ready_at=timezone.now(), claim_token="", lease_expires_at=None, updated_at=timezone.now()
    ):
        raise ClaimLost(deployment.pk)
    deployment.refresh_from_db()
    # An aws version has no URL of its own: it answers its deployment's once promoted.
    where = deployment.endpoint_url or "it answers its deployment's URL once promoted"
    deployment_record_event(deployment=deployment, stage="", message=f"ready: {where}")
    if deployment.version_of_id:
        _version_ready(deployment)


@transaction.atomic
def deployment_requeue(*, deployment: Deployment, reason: str, token: str, retry_in: float) -> None:
    """Hand a deployment back to the queue after a transient error; its task runs again in `retry_in` s.

    Its completed stages stay completed: the retry resumes at the stage that failed."""
    status = deployment.status
    resend_after = timezone.now() + timedelta(seconds=retry_in)
    fields = {"claim_token": "", "lease_expires_at": None, "enqueued_at": resend_after, "updated_at": timezone.now()}
    if status == Status.DEPLOYING:
        fields["status"] = Status.QUEUED
    if not _held(deployment, token, status).update(**fields):
        raise ClaimLost(deployment.pk)
    deployment.refresh_from_db()
    stage = deployment.stage if status == Status.DEPLOYING else Deployment.Stage.TEARDOWN
    deployment_record_event(deployment=deployment, stage=stage, level="warning", message=reason)


# ------------------------------------------------------------------ the reaper


def _expired(now):
    """Rows whose task's lease ran out: its worker died or stopped without handing them back.

    Rows claimed before leases existed (no token) count from their last change."""
    return Q(lease_expires_at__lt=now) & ~Q(claim_token="") | Q(
        claim_token="", lease_expires_at__isnull=True, status=Status.DEPLOYING, updated_at__lt=now - _lease()
    )


def _take_back(row: Deployment, now, *, resend: bool = True) -> str:
    """The worker running (or stopping) `row` stopped: queue it again, or give up past the bound.

    Conditional on the row being as it was read, so two reapers (or a reaper and a claim)
    count one stop once. Returns what happened: "requeued", "failed" or "" (someone was first)."""
    attempts = row.interruptions + 1
    limit = settings.SERVEML_DEPLOY_MAX_ATTEMPTS
    stopping = row.status == Status.STOPPING
    stage = Deployment.Stage.TEARDOWN if stopping else row.stage
    where = f"the {stage} stage" if stage else "its first stage"
    same = Deployment.objects.filter(
        pk=row.pk, status=row.status, claim_token=row.claim_token, lease_expires_at=row.lease_expires_at
    )
    with transaction.atomic():
        if attempts < limit:
            if not same.update(
                claim_token="",
                lease_expires_at=None,
                interruptions=attempts,
                enqueued_at=None,
                status=row.status if stopping else Status.QUEUED,
                updated_at=now,
            ):
                return ""
            deployment_record_event(
                deployment=row,
                stage=stage,
                level="warning",
                message=(
                    f"the worker {'stopping' if stopping else 'running'} it stopped during {where}; ServeML started "
                    f"it again (attempt {attempts + 1} of {limit}), "
                    f"{'from the teardown' if stopping else 'resuming there'}"
                ),
            )
            if resend:
                transaction.on_commit(lambda: _send(row.pk, "stop" if stopping else "deploy"))
            return "requeued"
        if not same.update(claim_token="", lease_expires_at=None, interruptions=attempts):
            return ""
        why = "this when they run out of memory or are restarted: an operator can find why in the worker's log"
        if stopping:
            deployment_stop_failed(
                deployment=Deployment.objects.get(pk=row.pk),
                message=(f"The worker stopping it stopped {attempts} times; ServeML gave up. Workers stop like {why}."),
            )
        else:
            deployment_fail(
                deployment=Deployment.objects.get(pk=row.pk),
                stage=row.stage,
                message=(
                    f"The worker running it stopped {attempts} times (the last time during {where}); ServeML gave up. "
                    f"Workers stop like {why}, then redeploy it."
                ),
            )
        return "failed"


def deployment_reap() -> dict[str, int]:
    """Bring back what no live task holds (celery beat runs this every SERVEML_REAP_INTERVAL_S).

    - deploying or stopping with an expired lease: its worker died. Re-queued (a new task
      resumes at the first stage not completed), or failed with why past
      SERVEML_DEPLOY_MAX_ATTEMPTS;
    - queued, or stopping and not yet claimed, whose task the broker never took (it was
      down) or that waited longer than SERVEML_REQUEUE_QUEUED_AFTER_S: sent again. The
      broker's queue cannot be read cheaply, so a task may exist: the claim makes the
      duplicate a no-op.
    """
    now = timezone.now()
    done = {"requeued": 0, "failed": 0, "resent": 0}
    for row in Deployment.objects.filter(_expired(now), status__in=[Status.DEPLOYING, Status.STOPPING]):
        outcome = _take_back(row, now)
        if outcome:
            done[outcome] += 1
    waiting = Q(status=Status.QUEUED) | Q(status=Status.STOPPING, claim_token="")
    # Never sent (the broker was down; a few seconds' grace for an upload whose send is under way),
    # or sent long ago: the message may be lost (a broker restarted without persistence).
    overdue = Q(enqueued_at__isnull=True, updated_at__lt=now - timedelta(seconds=5)) | Q(
        enqueued_at__lt=now - timedelta(seconds=settings.SERVEML_REQUEUE_QUEUED_AFTER_S)
    )
    for row in Deployment.objects.filter(waiting & overdue).only("pk", "status", "enqueued_at"):
        never_sent = row.enqueued_at is None
        if _send(row.pk, "stop" if row.status == Status.STOPPING else "deploy", quiet=never_sent):
            if never_sent:
                deployment_record_event(deployment=row, stage="", message="the broker answers again: sent to a worker")
            done["resent"] += 1
    if any(done.values()):
        log.info("reaper: %s", done)
    return done


def deployment_request_stop(*, deployment: Deployment) -> str:
    """Stop a deployment as its target allows, and say what happened.

    Local: at once (the runtime unloads it). AWS: the deployment becomes `stopping`
    and a task deletes its API, function and repository, which takes AWS seconds
    and may need retries: no web request waits on it. Raises StageError only for
    a local stop that failed.
    """
    if targets.get(deployment.target).stops_at_once:
        return deployment_stop(deployment=deployment)

    with transaction.atomic():
        # Conditional, so two clicks queue one teardown.
        moved = Deployment.objects.filter(
            pk=deployment.pk, status__in=[Deployment.Status.READY, Deployment.Status.FAILED]
        ).update(
            status=Deployment.Status.STOPPING,
            claim_token="",
            lease_expires_at=None,
            interruptions=0,
            enqueued_at=None,
            updated_at=timezone.now(),
        )
        if moved:
            deployment.status = Deployment.Status.STOPPING
            deployment_record_event(
                deployment=deployment, stage="", message="stop requested: deleting its AWS resources"
            )
            transaction.on_commit(lambda: _send(deployment.pk, "stop"))
    return "its AWS resources are being deleted; its page shows when that is done"


@transaction.atomic
def deployment_stop_failed(*, deployment: Deployment, message: str, token: str | None = None) -> None:
    """The teardown gave up: the deployment shows why, and can be stopped again.

    With `token`, only while that task holds it."""
    if token is not None and not _held(deployment, token, Status.STOPPING).select_for_update().exists():
        raise ClaimLost(deployment.pk)
    again = "delete it again" if deployment.is_deleted() else "stop it again"
    error = f"Stopping failed: {message} Some of its AWS resources may remain; {again} once this is fixed."
    deployment_update(
        deployment=deployment,
        status=Deployment.Status.FAILED,
        stage=Deployment.Stage.TEARDOWN,
        error=error,
        claim_token="",
        lease_expires_at=None,
    )
    deployment_record_event(deployment=deployment, stage=Deployment.Stage.TEARDOWN, level="error", message=error)


def deployment_stop(*, deployment: Deployment) -> str:
    """Tear down what serves the deployment, then mark it stopped.

    Raises StageError (with what to fix) when the cloud refuses to delete
    something; the deployment then keeps its status so the stop can be retried.
    """
    summary = targets.get(deployment.target).teardown(deployment)
    deleted = {}
    if deployment.is_deleted():  # a version its owner deleted: its files go too, once nothing serves it
        said, deleted = _delete_files(deployment)
        summary = f"{summary}; {said}"
    with transaction.atomic():
        deployment_update(
            deployment=deployment,
            status=Deployment.Status.STOPPED,
            stopped_at=timezone.now(),
            claim_token="",
            lease_expires_at=None,
            **deleted,
        )
        word = "deleted" if deployment.is_deleted() else "stopped"
        deployment_record_event(deployment=deployment, stage="", message=f"{word}: {summary}")
        if deployment.is_deleted():
            deployment_record_event(
                deployment=deployment.root, stage="", message=f"version {deployment.version} deleted: {summary}"
            )
    # Its versions stop with it; one still deploying is stopped when its pipeline ends (_version_ready).
    for version in deployment.versions.filter(status__in=[Status.READY, Status.FAILED]):
        deployment_stop(deployment=version)
    return summary


@transaction.atomic
def deployment_redeploy(*, deployment: Deployment) -> None:
    """Run the whole pipeline again from the stored files (operators, from the admin).

    The runtime drops the old build after the commit: its HTTP call may hang for its
    whole timeout, and must not hold the transaction (and the row's locks) meanwhile.
    Callbacks run in order, so it is done before the task is sent, and by then the row
    reads `queued`, which the runtime neither serves nor loads again."""
    if deployment.status in (Deployment.Status.DEPLOYING, Deployment.Status.STOPPING):
        return  # a task owns it
    if deployment.version_of_id or deployment.versions.exists():
        # Its URL would answer nothing until the pipeline ends: versions move it without a gap.
        raise VersionRefused(
            "It has versions: upload a new version, or promote one, instead of redeploying (a redeploy would take "
            "the deployment's URL down until it is ready again)."
        )
    deployment_update(
        deployment=deployment,
        status=Deployment.Status.QUEUED,
        stage="",
        error="",
        endpoint_url="",
        claimed_at=None,
        ready_at=None,
        stopped_at=None,
    )
    deployment_record_event(deployment=deployment, stage="", message="redeploy requested")
    target = targets.get(deployment.target)
    if target.stops_at_once:
        # robust: whatever the runtime does, the task below is still sent.
        transaction.on_commit(lambda: target.teardown(deployment), robust=True)
    _enqueue(deployment)


def key_digest(raw_key: str) -> str:
    return DeploymentKey.digest(raw_key)


class KeyRefused(Exception):
    """A key cannot be created; the message says why and what to do instead."""


def _access_changed(deployment: Deployment, *, pending: str) -> None:
    """Tell what serves the deployment about a change of keys or privacy.

    Local: the runtime re-reads them now (its sweep does anyway). AWS: the Lambda
    function's environment holds them, and changing it is an AWS call that may need
    retries, so a task does it after the commit, never the web request. Until the
    task says it is done, the event log says it is pending (`pending`), not done.
    """
    if deployment.target == Deployment.Target.LOCAL:
        transaction.on_commit(lambda: client.refresh_quietly(deployment.public_id))
        return
    if deployment.status in (Deployment.Status.STOPPING, Deployment.Status.STOPPED):
        return  # its function is gone or going
    if deployment.function_arn:
        deployment_record_event(deployment=deployment, stage="", message=f"updating the Lambda function: {pending}")
    # Queued even before the function exists: the task then leaves it to the provision
    # stage, which applies the keys it finds (see aws.provision), so no change is lost.
    transaction.on_commit(lambda: _task("sync_access").delay(deployment.pk))


@transaction.atomic
def deployment_key_create(*, deployment: Deployment, name: str) -> tuple[DeploymentKey, str]:
    """Create an API key; returns the row and the key itself, which is never stored or shown again.

    Raises KeyRefused when an aws deployment already has as many keys as its
    function's environment can hold."""
    # One key creation per deployment at a time, so the limit and the first-key rule hold
    # when two requests race; then read the row as it is now, not as the caller loaded it.
    Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    deployment.refresh_from_db(fields=["is_private", "status", "function_arn"])
    active = deployment.active_keys().count()
    limit = targets.get(deployment.target).max_keys
    if limit is not None and active >= limit:
        raise KeyRefused(
            f"This deployment already has {active} active API keys, the most an AWS Lambda function can hold "
            "(its environment is limited to 4 KB). Revoke keys that are no longer used, then create this one."
        )
    key, raw = DeploymentKey.issue(deployment=deployment, name=name)
    if not active and not deployment.is_private:
        # A deployment with keys is private unless its owner says otherwise.
        deployment_update(deployment=deployment, is_private=True)
    deployment_record_event(deployment=deployment, stage="", message=f"API key {key} created")
    made_private = not active and deployment.is_private
    _access_changed(
        deployment,
        pending=(
            f"it will need an API key such as {key} once that is done; until then it still answers without one"
            if made_private
            else f"key {key} works once that is done"
        ),
    )
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
    _access_changed(
        deployment,
        pending=(
            "until that is done, it still answers calls without a key"
            if private
            else "until that is done, calls without a key are still refused"
        ),
    )


def deployment_access_sync(*, deployment: Deployment) -> None:
    """Apply the deployment's privacy and keys to its Lambda function (the sync_access task).

    Raises TransientStageError (retry) or StageError (give up) as the AWS calls do."""
    if deployment.target != Deployment.Target.AWS or not deployment.function_arn:
        return  # no function yet: the provision stage applies the keys when it creates it
    if deployment.status in (Deployment.Status.STOPPING, Deployment.Status.STOPPED):
        return
    summary = targets.get(deployment.target).load().update_access(deployment)
    deployment_record_event(deployment=deployment, stage="", message=summary)


def deployment_access_sync_failed(*, deployment: Deployment, message: str) -> None:
    deployment_record_event(
        deployment=deployment,
        stage="",
        level="error",
        message=(
            f"Updating the Lambda function's keys failed: {message.rstrip('.')}. The function may not reflect "
            "the latest change of keys or privacy. To retry, switch the endpoint between public and private again (or "
            "create or revoke a key) once this is fixed; an operator can also redeploy it."
        ),
    )


# ------------------------------------------------------------------ versions


class VersionRefused(Exception):
    """A version cannot be uploaded or promoted now; the message says why and what to do."""


def _version_problem(root: Deployment) -> str | None:
    """Why `root` takes no new version now, or None."""
    if root.version_of_id:
        return f"This is version {root.version} of a deployment: upload new versions to the deployment itself."
    if root.status in (Status.STOPPING, Status.STOPPED):
        return "This deployment was stopped: its URL serves nothing. Deploy the model as a new deployment."
    if root.status == Status.FAILED:
        return (
            "This deployment's first version failed, so it has no URL to keep: deploy the fixed model as a new "
            "deployment."
        )
    if root.status != Status.READY:
        return "This deployment's first version is still deploying: upload a new version once it is ready."
    return None


@transaction.atomic
def deployment_version_create(
    *,
    root: Deployment,
    model_format: str,
    model_upload: UploadedFile,
    requirements_upload: UploadedFile,
    auto_promote: bool = True,
) -> Deployment:
    """Store a new version of `root` with the next number and queue its pipeline; the version
    that serves keeps serving until this one is ready and promoted. Raises VersionRefused."""
    root = Deployment.objects.select_for_update().get(pk=root.pk)  # one number per upload, even when two race
    if problem := _version_problem(root):
        raise VersionRefused(problem)
    number = (root.versions.aggregate(last=Max("version"))["last"] or 1) + 1
    version = Deployment(
        owner=root.owner,
        name=root.name,
        target=root.target,
        version_of=root,
        version=number,
        auto_promote=auto_promote,
        is_private=root.is_private,
        model_format=model_format,
    )
    _store_upload(version, model_upload, requirements_upload)
    then = "promoted once it is ready" if auto_promote else "ready for review once deployed; promote it to serve"
    deployment_record_event(deployment=version, stage="", message=f"version {number} queued; {then}")
    deployment_record_event(
        deployment=root,
        stage="",
        message=f"version {number} uploaded ({version.model_filename}); version {root.serving_version().version} "
        "keeps serving meanwhile",
    )
    _enqueue(version)
    return version


def deployment_version_get(*, root: Deployment, number: int) -> Deployment | None:
    if number == 1:
        return root
    if not 1 < number < 2**31:  # beyond the column's range: no such version, not a database error
        return None
    return root.versions.filter(version=number).first()


def deployment_version_promote(*, root: Deployment, number: int) -> Deployment:
    """Make version `number` the one `root`'s stable URL answers with (promote, or roll back).

    Its model processes are loaded and warm before the switch: the runtime routes new
    requests to them at once, requests in flight finish on the old ones, which stop once
    idle. The switch itself is one conditional UPDATE, so two promotes never interleave.
    Raises VersionRefused."""
    if root.version_of_id:
        raise VersionRefused("Promote versions through the deployment itself.")
    version = deployment_version_get(root=root, number=number)
    if version is None:
        raise VersionRefused(f"This deployment has no version {number}.")
    if version.status != Status.READY:
        raise VersionRefused(
            f"Version {number} is {version.get_status_display().lower()}: only a ready version can serve."
        )
    if root.status != Status.READY:
        raise VersionRefused("This deployment is not ready (it was stopped or failed): nothing can be promoted.")
    previous = root.serving_id
    if (previous or root.pk) == version.pk:
        return version
    try:
        _warm(version)  # first: the switch must not wait for a model to load
    except client.RuntimeUnavailable as exc:
        raise VersionRefused(
            f"Version {number} could not be loaded, so version {root.serving_version().version} keeps serving: {exc}"
        ) from None
    was = root.serving_version().version
    with transaction.atomic():
        # A promote ends a canary: the one promoted now takes all the traffic, whichever it was.
        switched = Deployment.objects.filter(pk=root.pk, serving_id=previous, status=Status.READY).update(
            serving=version, canary=None, canary_percent=0, shadow=None, updated_at=timezone.now()
        )
        if not switched:
            raise VersionRefused("The deployment changed meanwhile (another promote, or a stop): look again and retry.")
        _still_ready(version)
        root.serving = version
        canary, root.canary, root.canary_percent = root.canary_id, None, 0
        shadow, root.shadow = root.shadow_id, None
        word = "rolled back to" if number < was else "promoted"
        ended = " and ".join(name for name, was_on in (("canary", canary), ("shadow", shadow)) if was_on)
        ended = f" (its {ended} ended)" if ended else ""
        deployment_record_event(
            deployment=root,
            stage="",
            message=f"{word} version {number}: {root.endpoint_url} answers with it (was version {was}){ended}",
        )
        if version.pk != root.pk:
            deployment_record_event(deployment=version, stage="", message=f"now serving {root.endpoint_url}")
        _route(root, refused=f"version {was} keeps serving")
    return version


def _warm(version: Deployment) -> None:
    """Load a version's model processes before traffic moves to it (local). A Lambda version
    needs nothing: Lambda starts its instances on the first requests."""
    if version.target == Deployment.Target.LOCAL:
        client.load(version.public_id)


def _route(root: Deployment, *, refused: str) -> None:
    """Send `root`'s traffic where its row now says (inside the transaction that changed it).

    Local: the runtime re-routes after the commit. AWS: the alias moves now, and if AWS
    refuses, the change is rolled back and VersionRefused says why (`refused`: what still holds)."""
    if root.target == Deployment.Target.LOCAL:
        transaction.on_commit(lambda: client.route_quietly(root.public_id))
        return
    try:
        summary = targets.get(root.target).load().route(root)
    except StageError as exc:  # a TransientStageError too: the user retries, not a task
        raise VersionRefused(f"AWS did not move the deployment's Lambda alias, so {refused}: {exc}") from None
    deployment_record_event(deployment=root, stage="", message=summary)


CANARY_PERCENTS = range(1, 51)  # a canary is the smaller share: past half, promote it


def _warm_candidate(
    root: Deployment, number: int, *, role: str, can_be: str, no_traffic: str, serves: str
) -> Deployment:
    """Ready version `number` of ready `root`, not the serving one, loaded so that no request
    waits for its model: the `role` (canary, shadow) it is to take. Raises VersionRefused,
    its reasons worded for the role (`can_be`, `no_traffic`, `serves`)."""
    version = deployment_version_get(root=root, number=number)
    if version is None:
        raise VersionRefused(f"This deployment has no version {number}.")
    if root.status != Status.READY:
        raise VersionRefused(f"This deployment is not ready (it was stopped or failed): {no_traffic}.")
    if version.status != Status.READY:
        raise VersionRefused(
            f"Version {number} is {version.get_status_display().lower()}: only a ready version can {can_be}."
        )
    if (root.serving_id or root.pk) == version.pk:
        raise VersionRefused(f"Version {number} {serves}.")
    try:
        _warm(version)  # first: no request waits for its model to load
    except client.RuntimeUnavailable as exc:
        raise VersionRefused(f"Version {number} could not be loaded, so no {role} started: {exc}") from None
    return version


def _still_ready(version: Deployment) -> None:
    """Inside the transaction that sends traffic to `version`, after its root's row was updated (so
    locked: deployment_version_delete locks it first): refuse if the version was deleted meanwhile."""
    if not Deployment.objects.filter(pk=version.pk, status=Status.READY).exists():
        raise VersionRefused(f"Version {version.version} was deleted meanwhile: nothing changed.")


def _route_change(
    root: Deployment,
    *,
    expect: dict,
    change: dict,
    refused: str,
    message: str,
    to: Deployment | None = None,
) -> None:
    """Save `change` on `root` in one conditional UPDATE, only while it still has `expect` (else
    VersionRefused with `refused`) and the version it sends traffic `to` is still ready, record
    `message` and have the runtime route it anew."""
    with transaction.atomic():
        if not Deployment.objects.filter(pk=root.pk, **expect).update(**change, updated_at=timezone.now()):
            raise VersionRefused(refused)
        if to is not None:
            _still_ready(to)
        for field, value in change.items():
            setattr(root, field, value)
        deployment_record_event(deployment=root, stage="", message=message)
        _route(root, refused="its traffic did not change")


CHANGED_BEFORE_START = "The deployment changed meanwhile (a promote, or a stop): look again and retry."
CHANGED_BEFORE_END = "The deployment changed meanwhile (a promote, or another change): look again."


def deployment_canary_start(*, root: Deployment, number: int, percent: int) -> Deployment:
    """Send `percent` of `root`'s stable URL's requests to ready version `number` (a canary),
    the rest to the version that serves; a canary running already is replaced, or changes its
    share. The version is warm before the runtime routes anything to it. Raises VersionRefused."""
    if root.version_of_id:
        raise VersionRefused("Start a canary through the deployment itself.")
    if percent not in CANARY_PERCENTS:
        raise VersionRefused(f"A canary takes 1 to 50 percent of the requests, not {percent}.")
    version = _warm_candidate(
        root,
        number,
        role="canary",
        can_be="be a canary",
        no_traffic="it has no traffic to share",
        serves="serves every request already: a canary is another version",
    )
    _route_change(
        root,
        expect={"serving_id": root.serving_id, "status": Status.READY},
        change={"canary": version, "canary_percent": percent},
        refused=CHANGED_BEFORE_START,
        to=version,
        message=(
            f"canary: version {number} answers {percent}% of the requests to {root.endpoint_url}, "
            f"version {root.serving_version().version} the rest"
        ),
    )
    return version


def deployment_canary_end(*, root: Deployment, number: int | None = None) -> Deployment | None:
    """End `root`'s canary (cancel: the serving version takes every request again); with `number`,
    only if that version is the canary. The canary version, or None when there was none."""
    if root.version_of_id:
        raise VersionRefused("End a canary through the deployment itself.")
    canary = root.canary_id
    version = Deployment.objects.filter(pk=canary).first() if canary else None
    if version is None or (number is not None and version.version != number):
        raise VersionRefused(f"Version {number} is not a canary of this deployment." if number else "No canary runs.")
    _route_change(
        root,
        expect={"canary_id": canary},
        change={"canary": None, "canary_percent": 0},
        refused=CHANGED_BEFORE_END,
        message=(
            f"canary of version {version.version} ended: version {root.serving_version().version} answers every request"
        ),
    )
    return version


def deployment_shadow_start(*, root: Deployment, number: int) -> Deployment:
    """Shadow: ready version `number` also predicts a sample of the requests `root`'s stable URL
    answers, after they are answered, and the runtime counts how often it agrees with the serving
    version (runtime/shadow.py). One candidate at a time: another one replaces it. Raises VersionRefused."""
    if root.version_of_id:
        raise VersionRefused("Shadow versions through the deployment itself.")
    if root.target != Deployment.Target.LOCAL:
        raise VersionRefused(
            "Shadow comparison needs the local runtime, which copies answered requests to the candidate; "
            "on AWS, Lambda answers the requests itself. On AWS, try the new version as a canary (it answers "
            "a share of the requests), then promote it or roll back."
        )
    version = _warm_candidate(
        root,
        number,
        role="shadow",
        can_be="be shadowed",
        no_traffic="it has no requests to copy",
        serves="serves the requests already: shadow a candidate, another version",
    )
    _route_change(
        root,
        expect={"serving_id": root.serving_id, "status": Status.READY},
        change={"shadow": version},
        refused=CHANGED_BEFORE_START,
        to=version,
        message=(
            f"shadow: version {number} also predicts a sample of the requests to "
            f"{root.endpoint_url}, compared with the answers of the serving version"
        ),
    )
    return version


def deployment_shadow_end(*, root: Deployment, number: int | None = None) -> Deployment:
    """Stop shadowing (with `number`: only if that version is the shadowed one). Raises VersionRefused."""
    if root.version_of_id:
        raise VersionRefused("End a shadow through the deployment itself.")
    shadow = root.shadow_id
    version = Deployment.objects.filter(pk=shadow).first() if shadow else None
    if version is None or (number is not None and version.version != number):
        raise VersionRefused(f"Version {number} is not shadowed." if number else "No version is shadowed.")
    _route_change(
        root,
        expect={"shadow_id": shadow},
        change={"shadow": None},
        refused=CHANGED_BEFORE_END,
        message=f"shadow of version {version.version} ended",
    )
    return version


def _version_ready(version: Deployment) -> None:
    """A version's pipeline ended ready: promote it if its owner asked, stop it if its deployment was stopped."""
    root = Deployment.objects.get(pk=version.version_of_id)
    if root.status in (Status.STOPPING, Status.STOPPED):
        transaction.on_commit(lambda: deployment_stop(deployment=Deployment.objects.get(pk=version.pk)))
        return
    if not version.auto_promote:
        deployment_record_event(
            deployment=root, stage="", message=f"version {version.version} is ready for review: promote it to serve"
        )
        return

    def promote():
        try:
            deployment_version_promote(root=Deployment.objects.get(pk=root.pk), number=version.version)
        except VersionRefused as exc:
            deployment_record_event(deployment=version, stage="", level="warning", message=f"not promoted: {exc}")

    transaction.on_commit(promote)


def _delete_problem(root: Deployment, version: Deployment) -> str | None:
    """Why version `version` of `root` cannot be deleted now, or None."""
    number = version.version
    if root.status != Status.STOPPED:  # a stopped deployment's URL serves nothing: any version may go
        if (root.serving_id or root.pk) == version.pk:
            return (
                f"Version {number} serves the deployment's URL: promote (or roll back to) another version first, "
                "then delete this one."
            )
        if root.canary_id == version.pk:
            return (
                f"Version {number} is the deployment's canary ({root.canary_percent}% of its requests): end the "
                "canary (or promote the version) first."
            )
        if root.shadow_id == version.pk:
            return f"Version {number} is shadowed (it predicts a copy of live requests): stop the shadow first."
    if version.status == Status.DEPLOYING:
        # As for a deployment: a stage under way is not interrupted (it may be building or publishing).
        stage = f" (the {version.get_stage_display().lower()} stage)" if version.stage else ""
        return f"Version {number} is still deploying{stage}: delete it once it is ready or failed."
    return None


def version_deletable(*, root: Deployment, version: Deployment) -> bool:
    """Whether deployment_version_delete would take `version` now (the page offers it then)."""
    if not version.version_of_id or (version.is_deleted() and version.status != Status.FAILED):
        return False
    return version.status != Status.STOPPING and _delete_problem(root, version) is None


def deployment_version_delete(*, version: Deployment, by_user) -> str:
    """Delete a version of a deployment: it stops as a deployment does (local: its model processes are
    unloaded now; aws: a task deletes its Lambda version, unless the alias still sends requests to it),
    then its files (upload, build context) are deleted from storage. Its row and event log stay,
    `stopped`, with `deleted_at` set. A queued version is taken before its pipeline runs.

    Refused (VersionRefused, with what to do) for version 1 (the deployment itself: stop it), the
    version that serves the URL, the canary, the shadowed one, and a version still deploying.
    Says what happened; raises StageError only for a local teardown that failed, as a stop does."""
    if not version.version_of_id:
        raise VersionRefused(
            "Version 1 is the deployment itself: it is not deleted on its own. To take the deployment down with "
            "every version, stop it (Stop deployment on its page, or DELETE /api/deployments/<id>)."
        )
    at_once = targets.get(version.target).stops_at_once
    token = uuid.uuid4().hex
    now = timezone.now()
    with transaction.atomic():
        # The root's lock orders this after (or before) a promote, canary or shadow change in flight.
        root = Deployment.objects.select_for_update().get(pk=version.version_of_id)
        version = Deployment.objects.select_for_update().get(pk=version.pk)
        if by_user.pk != root.owner_id and not by_user.is_staff:
            raise VersionRefused("Only the deployment's owner (or an operator) can delete its versions.")
        if version.is_deleted() and version.status in (Status.STOPPING, Status.STOPPED):
            return "it was deleted already" if version.status == Status.STOPPED else "it is being deleted"
        if problem := _delete_problem(root, version):
            raise VersionRefused(problem)
        # Local: this request tears it down, holding a claim, so that if it dies the reaper hands the
        # teardown to a worker. AWS: the stop task does (deployment_request_stop's way).
        claim = {"claim_token": token, "lease_expires_at": now + _lease(), "claimed_at": now} if at_once else {}
        queued = version.status == Status.QUEUED  # its task finds it taken, and runs nothing
        Deployment.objects.filter(pk=version.pk).update(
            **{"claim_token": "", "lease_expires_at": None, **claim},
            status=Status.STOPPING,
            deleted_at=now,
            interruptions=0,
            enqueued_at=None,
            updated_at=now,
        )
        version.refresh_from_db()
        deployment_record_event(
            deployment=version,
            stage="",
            message=f"deleted by {by_user.get_username()}{' (its pipeline will not run)' if queued else ''}: "
            "stopping it, then deleting its files",
        )
        if not at_once:
            transaction.on_commit(lambda: _send(version.pk, "stop"))
    if at_once:
        return deployment_stop(deployment=version)
    return "its Lambda version and files are being deleted; its row shows when that is done"


def _delete_files(deployment: Deployment) -> tuple[str, dict]:
    """Delete a deleted version's files: its upload and build context in storage, and the build
    context unpacked on this host. What is already gone is not an error; one that cannot be
    deleted is said, not raised, so the version still ends stopped. Returns what happened, and
    the fields to empty (a file that could not be deleted keeps its name, for an operator)."""
    files = {
        "model_file": deployment.model_file.name,
        "requirements_file": deployment.requirements_file.name,
        "artifact": deployment.artifact,
    }
    cleared, kept = {}, []
    for field, name in files.items():
        if not name:
            continue
        try:
            default_storage.delete(name)
        except Exception as exc:  # storage backends raise their own (OSError, botocore's, …)
            log.warning("could not delete %s of deployment %s: %s", name, deployment.pk, exc)
            kept.append(name)
        else:
            cleared[field] = ""
    shutil.rmtree(builds.build_dir(deployment), ignore_errors=True)
    done = f"deleted its {len(cleared)} stored file(s)" if cleared or kept else "it had no stored files"
    return (f"{done}; could not delete {', '.join(kept)} (see the log)" if kept else done), cleared
