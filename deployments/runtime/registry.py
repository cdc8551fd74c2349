"""Which deployments exist and may be served on this host, read from the database.

`lookup` and `servable_access` are blocking ORM reads: the runtime runs them in a
thread (sync_to_async). `RecentMisses` remembers, briefly, the ids `lookup` found
nothing for, so a client repeating an unknown id costs no query per request.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from django.db import close_old_connections

from deployments import openapi, sandbox
from deployments.builds import restore_context
from deployments.environments import environment_path
from deployments.models import Deployment
from deployments.runtime.access import Access, access_for


@dataclass(frozen=True)
class Spec:
    """Where a servable deployment's pieces live on this host, and the uid its processes run as."""

    deployment_id: str
    environment: Path
    build_dir: Path
    model_path: Path
    uid: int
    # What the validate stage learnt about the model, for the V2 protocol's model metadata.
    signature: dict = field(default_factory=dict, compare=False)
    example: object = field(default=None, compare=False)


def _servable(deployments):
    return deployments.filter(status__in=[Deployment.Status.READY, Deployment.Status.DEPLOYING])


def lookup(deployment_id: str) -> tuple[Spec, Access] | None:
    """Read a servable deployment from the database (runs in a thread)."""
    close_old_connections()
    deployment = (
        _servable(Deployment.objects)
        .filter(public_id=deployment_id, target=Deployment.Target.LOCAL)
        .exclude(environment_key="")
        .exclude(artifact="")
        .first()
    )
    if deployment is None:
        return None
    build_dir = restore_context(deployment)
    spec = Spec(
        deployment_id,
        environment_path(deployment.environment_key),
        build_dir,
        build_dir / deployment.model_basename(),
        sandbox.uid_for(deployment.pk),
        deployment.signature or {},
        (deployment.example_request or {}).get("data"),
    )
    return spec, access_for(deployment)


def openapi_document(deployment_id: str) -> tuple[dict, Access] | None:
    """A servable deployment's OpenAPI document (deployments/openapi.py) and who may read it (runs in a
    thread). Read afresh each time: no model process is started to describe the model."""
    close_old_connections()
    deployment = (
        _servable(Deployment.objects)
        .filter(public_id=deployment_id, target=Deployment.Target.LOCAL)
        .exclude(endpoint_url="")
        .prefetch_related("keys")
        .first()
    )
    if deployment is None or not deployment.signature.get("methods"):
        return None
    found = openapi.prediction_document(
        title=deployment.name,
        endpoint_url=deployment.endpoint_url,
        signature=deployment.signature,
        example_request=deployment.example_request,
        private=deployment.is_private,
    )
    return found, access_for(deployment)


def servable_access(ids: list[str]) -> dict[str, Access]:
    """The access rules of those deployments that may still be served (runs in a thread)."""
    close_old_connections()
    rows = _servable(Deployment.objects).filter(public_id__in=ids).prefetch_related("keys")
    return {str(row.public_id): access_for(row) for row in rows}


class RecentMisses:
    """Ids with no servable deployment, each remembered for `seconds`, at most `size` of them.

    Anyone may send any UUID: without this, every request for an unknown one is a
    database query. Short-lived, because a deployment becomes servable at some
    point; the runtime's own `_load` forgets an id before it looks it up."""

    def __init__(self, seconds: float = 2.0, size: int = 1024, clock=time.monotonic):
        self.seconds = seconds
        self.size = size
        self.clock = clock
        self.expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self.expiry)

    def __contains__(self, deployment_id: str) -> bool:
        expiry = self.expiry.get(deployment_id)
        if expiry is None:
            return False
        if expiry > self.clock():
            return True
        del self.expiry[deployment_id]
        return False

    def add(self, deployment_id: str) -> None:
        self.expiry[deployment_id] = self.clock() + self.seconds
        self.expiry.move_to_end(deployment_id)
        while len(self.expiry) > self.size:
            self.expiry.popitem(last=False)  # the oldest: it expires first anyway

    def forget(self, deployment_id: str) -> None:
        self.expiry.pop(deployment_id, None)
