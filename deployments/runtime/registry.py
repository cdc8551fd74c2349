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
    # Whose it is: its model processes are forked from that owner's template (runtime/templates.py).
    owner: object = field(default=None, compare=False)


SERVABLE = (Deployment.Status.READY, Deployment.Status.DEPLOYING)


def _servable(deployments):
    return deployments.filter(status__in=SERVABLE)


def _servable_row(deployment_id: str) -> Deployment | None:
    """The servable row with this public id: a deployment, or a version of a servable one."""
    row = (
        _servable(Deployment.objects)
        .filter(public_id=deployment_id, target=Deployment.Target.LOCAL)
        .select_related("version_of", "serving")
        .first()
    )
    if row is None or (row.version_of_id and row.version_of.status not in SERVABLE):
        return None  # a version stops with its deployment
    return row


def lookup(deployment_id: str) -> tuple[Spec, Access] | None:
    """Read a servable deployment from the database (runs in a thread).

    A deployment's id resolves to the version that serves its stable URL: the Spec then
    names that version (its id keys the pool), and the access rules are the deployment's."""
    close_old_connections()
    row = _servable_row(deployment_id)
    if row is None:
        return None
    return _spec(row.serving if row.serving_id else row, access_for(row.root))


def lookup_canary(deployment_id: str) -> tuple[Spec, Access, int] | None:
    """A servable deployment's canary: the version that answers a share of its stable URL's
    requests, with the deployment's access rules, and that share in percent (runs in a thread).
    None without one, or when the canary version may not be served (it then drops out)."""
    close_old_connections()
    root = _servable_row(deployment_id)
    if root is None or root.version_of_id or not root.canary_id or not root.canary_percent:
        return None
    canary = Deployment.objects.filter(pk=root.canary_id, status=Deployment.Status.READY).first()
    found = _spec(canary, access_for(root)) if canary is not None else None
    return (*found, root.canary_percent) if found is not None else None


def canaries(ids: list[str]) -> dict[str, tuple[str, int]]:
    """For each servable deployment among `ids` with a servable canary: the canary version's id and
    its share, so the runtime's sweep follows a canary change it was not told about."""
    close_old_connections()
    rows = (
        _servable(Deployment.objects)
        .filter(
            public_id__in=ids, version_of__isnull=True, canary__status=Deployment.Status.READY, canary_percent__gt=0
        )
        .select_related("canary")
    )
    return {str(row.public_id): (str(row.canary.public_id), row.canary_percent) for row in rows}


def lookup_shadow(deployment_id: str) -> tuple[Spec, Access] | None:
    """A servable deployment's shadowed candidate, if it may be served (runs in a thread)."""
    close_old_connections()
    root = _servable_row(deployment_id)
    if root is None or root.version_of_id or not root.shadow_id:
        return None
    shadow = Deployment.objects.filter(pk=root.shadow_id, status=Deployment.Status.READY).first()
    return _spec(shadow, access_for(root)) if shadow is not None else None


def shadows(ids: list[str]) -> dict[str, str]:
    """For each servable deployment among `ids` with a servable shadowed candidate: its id."""
    close_old_connections()
    rows = (
        _servable(Deployment.objects)
        .filter(public_id__in=ids, version_of__isnull=True, shadow__status=Deployment.Status.READY)
        .select_related("shadow")
    )
    return {str(row.public_id): str(row.shadow.public_id) for row in rows}


def lookup_version(deployment_id: str, number: int) -> tuple[Spec, Access] | None:
    """Version `number` of a servable deployment, whichever serves its URL (V2's /versions/<n>; runs in a thread)."""
    close_old_connections()
    root = _servable_row(deployment_id)
    if root is None or root.version_of_id:
        return None
    version = root if number == 1 else root.versions.filter(version=number).first()
    return _spec(version, access_for(root)) if version is not None else None


def _spec(deployment: Deployment, access: Access) -> tuple[Spec, Access] | None:
    if deployment.status not in SERVABLE or not deployment.environment_key or not deployment.artifact:
        return None
    build_dir = restore_context(deployment)
    spec = Spec(
        str(deployment.public_id),
        environment_path(deployment.environment_key),
        build_dir,
        build_dir / deployment.model_basename(),
        sandbox.uid_for(deployment.pk),
        deployment.signature or {},
        (deployment.example_request or {}).get("data"),
        deployment.owner_id,
    )
    return spec, access


def serving(ids: list[str]) -> dict[str, str]:
    """For each servable deployment among `ids` (versions are not), the id of the version its
    stable URL answers with: the runtime's sweep catches a promote it was not told about."""
    close_old_connections()
    rows = _servable(Deployment.objects).filter(public_id__in=ids, version_of__isnull=True).select_related("serving")
    return {str(row.public_id): str(row.serving.public_id if row.serving_id else row.public_id) for row in rows}


def version_labels(version_id: str) -> tuple[str, int] | None:
    """The id of the deployment a version belongs to (its stable URL's) and its number, which
    label its metrics (runs in a thread, once per version the runtime loads)."""
    close_old_connections()
    row = Deployment.objects.filter(public_id=version_id).select_related("version_of").first()
    return (str(row.root.public_id), row.version) if row is not None else None


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
    found = openapi.deployment_document(deployment) if deployment is not None else None
    if found is None:
        return None
    return found, access_for(deployment.root)


def servable_access(ids: list[str]) -> dict[str, Access]:
    """The access rules of those deployments that may still be served (runs in a thread)."""
    close_old_connections()
    rows = (
        _servable(Deployment.objects)
        .filter(public_id__in=ids)
        .exclude(version_of__status__in=[Deployment.Status.STOPPING, Deployment.Status.STOPPED])
        .select_related("version_of")
        .prefetch_related("keys", "version_of__keys")
    )
    return {str(row.public_id): access_for(row.root) for row in rows}  # a version: its deployment's keys


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
