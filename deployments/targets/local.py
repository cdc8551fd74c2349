"""The local target: the ServeML runtime on this host serves the model."""

from deployments.models import Deployment
from deployments.pipeline.errors import StageError
from deployments.runtime import client


def provision(deployment: Deployment) -> str:
    deployment.update(endpoint_url=client.endpoint_url(deployment.public_id))
    try:
        loaded = client.load(deployment.public_id)
    except client.RuntimeUnavailable as exc:
        raise StageError(str(exc)) from None
    return f"registered with the local runtime and warmed ({loaded['processes']} model process)"


def teardown(deployment: Deployment) -> str:
    try:
        client.unload(deployment.public_id)
    except client.RuntimeUnavailable:
        # The runtime's sweep unloads stopped deployments on its own when it comes back.
        return "the runtime was not reachable; it stops serving this deployment as soon as it runs again"
    return "stopped serving on the local runtime"
