import logging
import os
import threading
import time
import uuid
from pathlib import Path

from django.conf import settings
from django.db import connection

from deployments import services, targets
from deployments.models import Deployment
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError, TransientStageError

log = logging.getLogger(__name__)
Stage = Deployment.Stage


class Pipelines(dict):
    """Each target's (stage, function) pairs, in the order its registry entry gives: the shared
    stages from pipeline.stages, the target's own from its module. A target's module is loaded
    when its first deployment runs, not when this module is imported (the web process imports
    it with the tasks, and must not load boto3 or docker)."""

    def __missing__(self, name: str) -> list:
        target = targets.get(name)
        shared = {Stage(stage) for stage in (*targets.SHARED_STAGES, targets.LAST_STAGE)}
        self[name] = [
            (Stage(stage), getattr(stages, stage) if stage in shared else target.stage_function(stage))
            for stage in target.pipeline()
        ]
        return self[name]


PIPELINES = Pipelines()


def run(deployment_id: int, *, retry_in: float | None = None) -> None:
    """Claim a deployment and run its stages, from the first one not completed.

    A deployment another task holds is left to it. A transient error hands the
    deployment back and is raised again for the task to retry it in `retry_in`
    seconds; with no `retry_in` (the last try) it fails the deployment instead.
    """
    token = uuid.uuid4().hex
    deployment = services.deployment_claim(deployment_id=deployment_id, token=token)
    if deployment is None:
        log.info("deployment %s is not queued (done, or another task runs it); nothing to do", deployment_id)
        return
    if deployment.completed_stages:
        log.info("deployment %s resumes after %s", deployment_id, ", ".join(deployment.completed_stages))
    try:
        with Heartbeat(deployment_id, token, on_overrun=_fail_overrun) as heartbeat:
            _run_stages(deployment, token, retry_in, heartbeat)
    except services.ClaimLost:
        # Our lease ran out (this worker stalled) and another task has it now: leave it alone.
        log.warning("deployment %s was taken over by another task; this one stops", deployment_id)


def _run_stages(deployment: Deployment, token: str, retry_in: float | None, heartbeat: "Heartbeat") -> None:
    for stage, function in PIPELINES[deployment.target]:
        if stage in deployment.completed_stages:
            continue  # stages are idempotent, but a finished one need not run again
        services.deployment_set_stage(deployment=deployment, stage=stage, token=token)
        heartbeat.stage_started(stage)
        started = time.monotonic()
        try:
            _hold_for_tests(deployment, stage)
            summary = function(deployment)
            _hold_for_tests(deployment, f"{stage}.done")
        except TransientStageError as exc:
            if retry_in is None:
                services.deployment_fail(
                    deployment=deployment, stage=stage, message=str(exc), duration_ms=_ms(started), token=token
                )
                return
            services.deployment_requeue(
                deployment=deployment, reason=f"{exc} — retrying", token=token, retry_in=retry_in
            )
            raise
        except StageError as exc:
            services.deployment_fail(
                deployment=deployment, stage=stage, message=str(exc), duration_ms=_ms(started), token=token
            )
            return
        except Exception as exc:  # a bug, not the user's fault: say so without a traceback
            log.exception("stage %s of deployment %s crashed", stage, deployment.pk)
            services.deployment_fail(
                deployment=deployment,
                stage=stage,
                duration_ms=_ms(started),
                token=token,
                message=f"ServeML hit an internal error in the {stage} stage ({type(exc).__name__}). "
                "An operator can find the details in the worker log; redeploy once it is fixed.",
            )
            return
        services.deployment_complete_stage(
            deployment=deployment, stage=stage, token=token, message=summary, duration_ms=_ms(started)
        )
    services.deployment_mark_ready(deployment=deployment, token=token)


def stop(deployment_id: int, *, retry_in: float | None = None) -> None:
    """Claim a stopping deployment and tear it down; transient errors as in `run`."""
    token = uuid.uuid4().hex
    deployment = services.deployment_claim_stop(deployment_id=deployment_id, token=token)
    if deployment is None:
        return  # stopped by an earlier delivery of this task, or another task is stopping it
    try:
        with Heartbeat(deployment_id, token, on_overrun=_fail_stop_overrun) as heartbeat:
            heartbeat.stage_started(Stage.TEARDOWN)
            services.deployment_stop(deployment=deployment)
    except TransientStageError as exc:
        if retry_in is None:
            services.deployment_stop_failed(deployment=deployment, message=str(exc))
            return
        services.deployment_requeue(deployment=deployment, reason=f"{exc} — retrying", token=token, retry_in=retry_in)
        raise
    except StageError as exc:
        services.deployment_stop_failed(deployment=deployment, message=str(exc))


def _overrun_message(stage: str) -> str:
    minutes = settings.SERVEML_STAGE_TIMEOUT_S / 60
    return (
        f"The {Stage(stage).label.lower()} stage did not finish within {minutes:g} minutes, so ServeML stopped "
        "waiting for it. Try again; if it happens again, an operator can see in the worker log what it waited on."
    )


def _fail_overrun(deployment_id: int, token: str, stage: str) -> None:
    deployment = Deployment.objects.get(pk=deployment_id)
    services.deployment_fail(deployment=deployment, stage=stage, token=token, message=_overrun_message(stage))


def _fail_stop_overrun(deployment_id: int, token: str, stage: str) -> None:
    deployment = Deployment.objects.get(pk=deployment_id)
    services.deployment_stop_failed(deployment=deployment, message=_overrun_message(stage), token=token)


class Heartbeat:
    """Renews a claim's lease every third of it while the task works.

    So a live worker keeps its deployment however long a stage takes, and a dead one
    loses it within one lease (SERVEML_CLAIM_LEASE_S), for the reaper to hand on.
    A task that leaves without finishing (an exception) lets its lease lapse at once.
    A stage still running after SERVEML_STAGE_TIMEOUT_S is hung on something without a
    timeout of its own: the heartbeat then fails the deployment with why (`on_overrun`)
    and stops; if the stuck task ever moves again it finds its claim gone and writes nothing.
    """

    def __init__(self, deployment_id: int, token: str, *, on_overrun):
        self.deployment_id, self.token, self.on_overrun = deployment_id, token, on_overrun
        self.stage, self.stage_since = "", time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{deployment_id}", daemon=True)

    def stage_started(self, stage: str) -> None:
        self.stage, self.stage_since = stage, time.monotonic()

    def __enter__(self):
        # Inside a transaction (a test calling the runner directly) no one else sees the
        # claim, and a second connection would wait on the rows this one holds.
        if not connection.in_atomic_block:
            self.thread.start()
        return self

    def __exit__(self, kind, error, traceback):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if kind is not None and not issubclass(kind, (services.ClaimLost, TransientStageError)):
            try:
                services.deployment_release_claim(deployment_id=self.deployment_id, token=self.token)
            except Exception:  # the lease then runs out on its own
                log.warning("could not release the claim on deployment %s", self.deployment_id, exc_info=True)

    def _beat(self) -> None:
        try:
            while not self.stopped.wait(settings.SERVEML_CLAIM_LEASE_S / 3):
                try:
                    if self.stage and time.monotonic() - self.stage_since > settings.SERVEML_STAGE_TIMEOUT_S:
                        log.error("deployment %s: the %s stage overran; failing it", self.deployment_id, self.stage)
                        self.on_overrun(self.deployment_id, self.token, self.stage)
                        return
                    if not services.deployment_renew_claim(deployment_id=self.deployment_id, token=self.token):
                        return  # not ours any more (finished, or taken over): the runner finds out at its next step
                except services.ClaimLost:
                    return  # finished or taken over in the meantime
                except Exception:  # the database blinked: try again at the next beat, the lease has slack
                    log.warning("could not renew the lease of deployment %s", self.deployment_id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection


def _hold_for_tests(deployment: Deployment, point: str) -> None:
    """Test-only (tests/test_faults.py): with SERVEML_TEST_HOLD_DIR set, wait at `point` while
    a file of that name exists there, having said so in `<point>.held`, so that a fault lands
    exactly inside a stage. Unset everywhere else, this returns at once."""
    folder = os.environ.get("SERVEML_TEST_HOLD_DIR")
    if not folder or not (Path(folder) / point).exists():
        return
    held = Path(folder) / f"{point}.held"
    held.with_suffix(".tmp").write_text(f"{os.getpid()} {deployment.public_id}")
    held.with_suffix(".tmp").rename(held)
    deadline = time.monotonic() + 300
    while (Path(folder) / point).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
