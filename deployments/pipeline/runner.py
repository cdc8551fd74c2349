import logging
import time

from deployments import services
from deployments.models import Deployment
from deployments.pipeline import aws, image, local, stages
from deployments.pipeline.errors import StageError, TransientStageError

log = logging.getLogger(__name__)
Stage = Deployment.Stage

# Stage functions per target, in order: both share everything up to package, and verify.
SHARED = [
    (Stage.INSPECT, stages.inspect),
    (Stage.ENVIRONMENT, stages.environment),
    (Stage.VALIDATE, stages.validate),
    (Stage.PACKAGE, stages.package),
]
PIPELINES = {
    Deployment.Target.LOCAL: [*SHARED, (Stage.PROVISION, local.provision), (Stage.VERIFY, stages.verify)],
    Deployment.Target.AWS: [
        *SHARED,
        (Stage.BUILD, image.build),
        (Stage.PUSH, image.push),
        (Stage.PROVISION, aws.provision),
        (Stage.VERIFY, stages.verify),
    ],
}


def run(deployment_id: int) -> None:
    """Run a claimed deployment's stages; the claim makes a redelivered task a no-op."""
    deployment = services.deployment_claim(deployment_id=deployment_id)
    if deployment is None:
        log.info("deployment %s is not queued; nothing to do", deployment_id)
        return
    for stage, function in PIPELINES[deployment.target]:
        services.deployment_set_stage(deployment=deployment, stage=stage)
        started = time.monotonic()
        try:
            summary = function(deployment)
        except TransientStageError:
            raise
        except StageError as exc:
            services.deployment_fail(deployment=deployment, stage=stage, message=str(exc),
                                     duration_ms=_ms(started))
            return
        except Exception as exc:  # a bug, not the user's fault: say so without a traceback
            log.exception("stage %s of deployment %s crashed", stage, deployment.pk)
            services.deployment_fail(
                deployment=deployment, stage=stage, duration_ms=_ms(started),
                message=f"ServeML hit an internal error in the {stage} stage ({type(exc).__name__}). "
                "An operator can find the details in the worker log; redeploy once it is fixed.",
            )
            return
        services.deployment_record_event(deployment=deployment, stage=stage, message=summary,
                                         duration_ms=_ms(started))
    services.deployment_mark_ready(deployment=deployment)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
