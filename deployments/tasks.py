from celery import shared_task

from deployments import pipeline, services
from deployments.models import Deployment
from deployments.pipeline.errors import TransientStageError


@shared_task(bind=True, max_retries=4, acks_late=True)
def deploy(self, deployment_id: int) -> None:
    try:
        pipeline.run(deployment_id)
    except TransientStageError as exc:
        deployment = Deployment.objects.get(pk=deployment_id)
        if self.request.retries >= self.max_retries:
            services.deployment_fail(deployment=deployment, stage=deployment.stage, message=str(exc))
            return
        services.deployment_requeue(deployment=deployment, reason=f"{exc} — retrying")
        # Exponential backoff with jitter, capped at five minutes.
        import random

        countdown = min(300, 5 * 2**self.request.retries) * random.uniform(0.5, 1.0)
        raise self.retry(countdown=countdown) from exc
