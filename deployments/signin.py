"""Sign-in throttling: django-axes counts failed sign-ins (the sign-in page, the admin's and
POST /api/token) per account and per address; this is what ServeML answers once it has
locked one (settings.py, "Sign-in throttling"; the README says why both)."""

import math

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.db.models import Max, Q
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone


def client_address(request) -> str:
    """The address failures count against (AXES_CLIENT_IP_CALLABLE).

    The peer's, unless SERVEML_TRUSTED_PROXIES proxies stand in front: then the address
    the outermost of them saw, counted from the right of X-Forwarded-For (each proxy
    appends its peer; whatever lies further left the client wrote itself)."""
    proxies = settings.SERVEML_TRUSTED_PROXIES
    if proxies:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) >= proxies:
            return forwarded[-proxies]
    return request.META.get("REMOTE_ADDR", "")


def retry_after(request, credentials: dict | None = None) -> int:
    """Seconds until the lock lifts, at most: a failure counts for the cool-off after it."""
    from axes.helpers import get_client_username, get_cool_off
    from axes.models import AccessAttempt

    cool_off = get_cool_off(request)
    username = get_client_username(request, credentials)
    address = getattr(request, "axes_ip_address", None) or client_address(request)
    counted = Q(ip_address=address)
    if username:
        counted |= Q(username=username)
    last = AccessAttempt.objects.filter(counted).aggregate(last=Max("attempt_time"))["last"]
    if last is None:
        return math.ceil(cool_off.total_seconds())
    return max(1, math.ceil((last + cool_off - timezone.now()).total_seconds()))


def message(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return (
        "Too many failed sign-ins for this account or from this address. "
        f"Try again in {minutes} minute{'s' if minutes > 1 else ''}."
    )


def throttled_response(request, response=None, credentials: dict | None = None):
    """429 with when to try again: JSON for the API, the sign-in page for a browser (AXES_LOCKOUT_CALLABLE)."""
    seconds = retry_after(request, credentials)
    if request.path.startswith("/api/"):
        answer = JsonResponse({"error": message(seconds), "retry_after": seconds}, status=429)
    else:
        context = {
            "form": AuthenticationForm(request),
            "throttled": message(seconds),
            "next": request.POST.get("next") or request.GET.get("next", ""),
        }
        answer = render(request, "registration/login.html", context, status=429)
    answer["Retry-After"] = str(seconds)
    return answer
