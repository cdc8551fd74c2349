import random

from celery import shared_task

from deployments import services
from deployments.models import Deployment
from deployments.pipeline import runner
from deployments.pipeline.errors import StageError, TransientStageError


@shared_task(bind=True, max_retries=4, acks_late=True)
def deploy(self, deployment_id: int) -> None:
    countdown = None if self.request.retries >= self.max_retries else backoff(self.request.retries)
    try:
        runner.run(deployment_id, retry_in=countdown)
    except TransientStageError as exc:  # the runner handed the deployment back to the queue
        raise self.retry(countdown=countdown) from exc


@shared_task(bind=True, max_retries=4, acks_late=True)
def stop(self, deployment_id: int) -> None:
    """Tear down a deployment on its cloud (services.deployment_request_stop queues this)."""
    countdown = None if self.request.retries >= self.max_retries else backoff(self.request.retries)
    try:
        runner.stop(deployment_id, retry_in=countdown)
    except TransientStageError as exc:
        raise self.retry(countdown=countdown) from exc


@shared_task(ignore_result=True)
def reap() -> None:
    """Celery beat runs this (CELERY_BEAT_SCHEDULE): re-queue what dead workers left."""
    services.deployment_reap()


@shared_task(bind=True, max_retries=4, acks_late=True)
def sync_access(self, deployment_id: int) -> None:
    """Bring an aws deployment's Lambda function in step with its keys and privacy
    (services queue this whenever they change)."""
    deployment = Deployment.objects.get(pk=deployment_id)
    try:
        services.deployment_access_sync(deployment=deployment)
    except TransientStageError as exc:
        if self.request.retries >= self.max_retries:
            services.deployment_access_sync_failed(deployment=deployment, message=str(exc))
            return
        services.deployment_record_event(
            deployment=deployment,
            stage="",
            level="warning",
            message=f"{exc} — retrying the update of the Lambda function's keys",
        )
        raise self.retry(countdown=backoff(self.request.retries)) from exc
    except StageError as exc:
        services.deployment_access_sync_failed(deployment=deployment, message=str(exc))


def backoff(retries: int) -> float:
    """Exponential backoff with jitter, capped at five minutes."""
    return min(300, 5 * 2**retries) * random.uniform(0.5, 1.0)
