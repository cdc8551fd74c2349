"""How the worker and the web process talk to the local runtime."""

import httpx
from django.conf import settings


class RuntimeUnavailable(Exception):
    pass


def endpoint_url(public_id) -> str:
    """The prediction URL users call."""
    return f"{settings.SERVEML_RUNTIME_URL}/predict/{public_id}"


def internal_endpoint_url(public_id) -> str:
    """The same endpoint, as ServeML's own processes reach it."""
    return f"{settings.SERVEML_RUNTIME_INTERNAL_URL}/predict/{public_id}"


def server_side_url(deployment) -> str:
    """Where ServeML itself calls a deployment's endpoint (verify stage, try-it form)."""
    if deployment.target == "local":
        return internal_endpoint_url(deployment.public_id)
    return deployment.endpoint_url


def _control(action: str, public_id, timeout: float) -> httpx.Response:
    try:
        return httpx.post(
            f"{settings.SERVEML_RUNTIME_INTERNAL_URL}/{action}/{public_id}",
            headers={"Authorization": f"Bearer {settings.SERVEML_RUNTIME_TOKEN}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise RuntimeUnavailable(
            f"the ServeML runtime at {settings.SERVEML_RUNTIME_INTERNAL_URL} did not answer ({exc}). "
            "Start it with `make run` (or `manage.py runtime`) and redeploy."
        ) from None


def load(public_id) -> dict:
    """Start the deployment's model processes and wait until the model is loaded."""
    response = _control("_load", public_id, timeout=settings.SERVEML_SANDBOX_WALL_SECONDS + 30)
    if response.status_code != 200:
        try:
            why = response.json().get("error", response.text)
        except ValueError:  # not JSON: a crash in the runtime, answered by the ASGI server itself
            why = f"it answered {response.status_code} {response.text[:200]!r} (see the runtime's log)"
        raise RuntimeUnavailable(f"the runtime could not load the model: {why}")
    return response.json()


def unload(public_id) -> None:
    _control("_unload", public_id, timeout=30)


def refresh_quietly(public_id) -> None:
    """Ask the runtime to re-read a deployment's keys; its sweep does it anyway if this fails."""
    try:
        _control("_refresh", public_id, timeout=10)
    except RuntimeUnavailable:
        pass


def internal_headers() -> dict:
    """Lets ServeML's own calls (verify, try-it) through a private endpoint of the local runtime."""
    return {"X-ServeML-Internal": settings.SERVEML_RUNTIME_TOKEN}


def server_side_headers(deployment) -> dict:
    """What ServeML's own calls to server_side_url(deployment) may carry.

    The runtime's token also authorises its _load and _unload control calls, so it goes
    only to the local runtime's internal URL, never to another target's public URL
    (an aws endpoint is API Gateway's: whoever runs or logs it would hold the token)."""
    if deployment.target == "local":
        return internal_headers()
    return {}


def route_quietly(public_id) -> None:
    """Ask the runtime to send a deployment's stable URL to the version that serves it now
    (services.deployment_version_promote); its sweep does it anyway if this fails."""
    try:
        _control("_route", public_id, timeout=settings.SERVEML_SANDBOX_WALL_SECONDS + 30)
    except RuntimeUnavailable:
        pass


def figures(public_id=None, timeout: float = 2.0) -> dict:
    """The runtime's live figures (runtime/metrics.py): for one deployment and its versions,
    or for every deployment it has served when `public_id` is None. RuntimeUnavailable when
    the runtime does not answer, quickly: a page waits for this."""
    url = f"{settings.SERVEML_RUNTIME_INTERNAL_URL}/_figures" + (f"/{public_id}" if public_id else "")
    try:
        response = httpx.get(
            url, headers={"Authorization": f"Bearer {settings.SERVEML_RUNTIME_TOKEN}"}, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise RuntimeUnavailable(f"the runtime did not answer ({exc})") from None
    if response.status_code != 200:
        raise RuntimeUnavailable(f"the runtime answered {response.status_code}")
    return response.json()


def shadow_report(public_id, timeout: float = 1.0) -> dict | None:
    """What the shadow comparison of a deployment found so far (runtime/shadow.py), or None when
    the runtime shadows none of its versions. RuntimeUnavailable when it does not answer."""
    url = f"{settings.SERVEML_RUNTIME_INTERNAL_URL}/_shadow/{public_id}"
    try:
        response = httpx.get(
            url, headers={"Authorization": f"Bearer {settings.SERVEML_RUNTIME_TOKEN}"}, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise RuntimeUnavailable(f"the runtime did not answer ({exc})") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise RuntimeUnavailable(f"the runtime answered {response.status_code}")
    return response.json()
