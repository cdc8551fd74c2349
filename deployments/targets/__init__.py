"""Where a deployment runs: one module per target, behind this registry.

A target module has a function per stage it adds after `package` (each takes the
deployment and returns a one-line summary for the event log, or raises a StageError,
like every stage), `teardown(deployment) -> str`, and may have
`verify_headers(deployment)`: a context manager giving the headers the verify stage
calls the endpoint with, and `verify_post(deployment)`: what calls it instead of
httpx.post (or None), for one with no URL of its own (an aws version, until it serves).
Its entry in TARGETS says which stages those are, in order, and what it needs to be
configured. Adding a target is a module here and an entry
below (its name and label go in Deployment.Target, with the other labels).

This module stays light on purpose: the web process reads it (the status page's stages,
whether a target is configured, how many keys it holds), and a target's module may
load heavy SDKs (aws: boto3 and docker), so it is imported only when its code runs.
"""

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from django.conf import settings

from deployments.models import Deployment
from deployments.runtime import client

Stage = Deployment.Stage

# Every target runs these first, then its own stages, then verify (deployments/pipeline/stages.py).
SHARED_STAGES = (Stage.INSPECT, Stage.ENVIRONMENT, Stage.VALIDATE, Stage.PACKAGE)
LAST_STAGE = Stage.VERIFY


@dataclass(frozen=True)
class Target:
    name: str  # a Deployment.Target value
    module: str  # imported on first use
    stages: tuple[str, ...]  # after package, before verify: the module has a function of each name
    required_settings: tuple[str, ...] = ()  # all must be set for the target to be offered
    not_configured: str = ""  # what an operator must do, shown when someone picks it anyway
    stops_at_once: bool = True  # False: teardown is a task (cloud calls that may need retries), not the request
    max_keys: int | None = None  # active API keys a deployment may hold; None: no limit

    @property
    def label(self) -> str:
        return Deployment.Target(self.name).label

    def pipeline(self) -> list[str]:
        """Every stage a deployment to this target goes through, in order."""
        return [*SHARED_STAGES, *self.stages, LAST_STAGE]

    def is_configured(self) -> bool:
        return all(getattr(settings, name, None) for name in self.required_settings)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def stage_function(self, stage: str):
        return getattr(self.load(), stage)

    def teardown(self, deployment: Deployment) -> str:
        return self.load().teardown(deployment)

    def verify_headers(self, deployment: Deployment):
        return getattr(self.load(), "verify_headers", _server_side_headers)(deployment)

    def verify_post(self, deployment: Deployment):
        hook = getattr(self.load(), "verify_post", None)
        return hook(deployment) if hook else None


@contextmanager
def _server_side_headers(deployment: Deployment):
    yield client.server_side_headers(deployment), ""


TARGETS = {
    target.name: target
    for target in (
        Target(name=Deployment.Target.LOCAL, module="deployments.targets.local", stages=(Stage.PROVISION,)),
        Target(
            name=Deployment.Target.AWS,
            module="deployments.targets.aws",
            stages=(Stage.BUILD, Stage.PUSH, Stage.PROVISION),
            required_settings=("SERVEML_AWS_REGION", "SERVEML_LAMBDA_ROLE_ARN"),
            not_configured=(
                "The aws target is not configured on this ServeML: an operator must set AWS credentials "
                "(the standard boto3 way), SERVEML_AWS_REGION and SERVEML_LAMBDA_ROLE_ARN (see the README's "
                "“AWS target”). The local target works without them."
            ),
            stops_at_once=False,
            # Lambda allows 4 KB of environment variables in all, and each key's digest takes 65
            # bytes of SERVEML_KEY_SHA256: 40 keys (2.6 KB) leave room for the other variables.
            max_keys=40,
        ),
    )
}


def get(name: str) -> Target:
    return TARGETS[name]
