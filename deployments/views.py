import json
from datetime import UTC, datetime

import httpx
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from deployments import csvbatch, services, targets
from deployments.forms import DeploymentForm, SignUpForm, VersionForm
from deployments.models import Deployment
from deployments.pipeline.errors import StageError
from deployments.runtime import client


def site_context(request):
    return {"allow_signup": settings.SERVEML_ALLOW_SIGNUP, "sandbox_off": settings.SERVEML_SANDBOX == "off"}


def health(request):
    return JsonResponse({"status": "ok"})


def signup(request):
    if not settings.SERVEML_ALLOW_SIGNUP:
        raise Http404("Sign-up is switched off on this ServeML; ask an operator for an account.")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # Named: django-axes' backend stands before ModelBackend, and it does not sign anyone in.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("deployment-list")
    return render(request, "registration/signup.html", {"form": form})


def own_deployment(request, public_id) -> Deployment:
    # Another user's deployment is a 404, exactly like one that does not exist.
    return get_object_or_404(Deployment, public_id=public_id, owner=request.user)


def upload_too_large(request) -> bool:
    """A body far over the limit is refused before Django reads any of it."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    limit = settings.SERVEML_MAX_UPLOAD_BYTES + settings.SERVEML_MAX_REQUIREMENTS_BYTES + 1024**2
    return length > limit


def bound_form(request, form_class=DeploymentForm) -> DeploymentForm:
    if upload_too_large(request):
        return form_class(data={}, oversized={"model_file": settings.SERVEML_MAX_UPLOAD_BYTES})
    files = request.FILES  # streams the upload through SizeLimitUploadHandler
    return form_class(request.POST, files, oversized=getattr(request, "oversized_uploads", None))


@login_required
def deployment_list(request):
    deployments = list(request.user.deployments.filter(version_of__isnull=True))  # versions: on their page
    return render(request, "deployments/list.html", {"deployments": deployments, "rates": list_rates(deployments)})


def list_rates(deployments: list[Deployment]) -> bool:
    """Sets `requests_per_minute` (the last minute's, from the runtime in one call) on each ready
    local deployment; False when none is ready or the runtime does not answer (no column then)."""
    local = [d for d in deployments if d.status == Deployment.Status.READY and d.target == Deployment.Target.LOCAL]
    if not local:
        return False
    try:
        found = client.figures(timeout=1.0)
    except client.RuntimeUnavailable:
        return False
    for d in local:
        d.requests_per_minute = found.get(str(d.public_id), {}).get("total", {}).get("requests_per_minute", 0)
    return True


@login_required
def deployment_new(request):
    form = DeploymentForm()
    if request.method == "POST":
        form = bound_form(request)
        if form.is_valid():
            deployment = form.create_deployment(owner=request.user)
            return redirect(deployment)
    return render(request, "deployments/new.html", {"form": form, "max_upload": settings.SERVEML_MAX_UPLOAD_BYTES})


def timeline(deployment: Deployment) -> list[dict]:
    """One row per stage of the deployment's pipeline: state and duration."""
    events = {}
    for event in deployment.events.all():
        if event.stage and event.duration_ms is not None:
            events[event.stage] = event
    rows = []
    for stage in targets.get(deployment.target).pipeline():
        event = events.get(stage)
        if event is not None:
            state = "failed" if event.level == "error" else "done"
        elif deployment.stage == stage and deployment.status == Deployment.Status.DEPLOYING:
            state = "running"
        else:
            state = "pending"
        rows.append(
            {
                "stage": stage,
                "label": Deployment.Stage(stage).label,
                "state": state,
                "seconds": event.duration_ms / 1000 if event else None,
            }
        )
    return rows


def curl_example(deployment: Deployment) -> str:
    example = deployment.serving_version().example_request  # what its URL answers with now
    if not example:
        return ""
    body = json.dumps(example)
    return f"curl -X POST {deployment.endpoint_url} \\\n  -H 'Content-Type: application/json' \\\n  -d '{body}'"


def detail_context(deployment: Deployment, **extra) -> dict:
    serving = deployment.serving_version()  # a deployment's URL answers with the version that serves it
    return {
        **extra,
        "deployment": deployment,
        "serving": serving,
        "keys": deployment.active_keys(),
        "events": deployment.events.all(),
        "timeline": timeline(deployment),
        "curl": curl_example(deployment),
        "example_json": json.dumps(serving.example_request) if serving.example_request else "",
        "max_csv": settings.SERVEML_MAX_CSV_BYTES,
        **versions_context(deployment, extra.get("version_form")),
    }


def versions_context(deployment: Deployment, form: VersionForm | None) -> dict:
    """A deployment's versions, for its page: which one serves, and a form for the next one."""
    if deployment.version_of_id:
        return {"versions": None}
    versions = deployment.all_versions()
    return {
        "versions": versions,
        "serving_pk": deployment.serving_id or deployment.pk,
        "canary_pk": deployment.canary_id,
        "shadow_pk": deployment.shadow_id,
        "deletable": {v.pk for v in versions if services.version_deletable(root=deployment, version=v)},
        "shadow_report": shadow_report(deployment),
        "versions_busy": any(not version.is_terminal() for version in versions),
        "version_form": form or VersionForm(),
    }


@login_required
def deployment_detail(request, public_id):
    deployment = own_deployment(request, public_id)
    return render(
        request, "deployments/detail.html", detail_context(deployment) | figures_context(deployment, fetch=False)
    )


@login_required
def deployment_status(request, public_id):
    """The fragment the status page polls with htmx until the deployment is terminal."""
    # A terminal deployment's fragment carries no hx-trigger, so polling stops there.
    deployment = own_deployment(request, public_id)
    return render(request, "deployments/_status.html", detail_context(deployment))


FIGURES_SECONDS = 5  # slower than the status fragment's poll: each one asks the runtime


@login_required
def deployment_figures(request, public_id):
    """The live figures fragment, polled with htmx while the deployment may be called."""
    deployment = own_deployment(request, public_id)
    return render(request, "deployments/_figures.html", figures_context(deployment))


def figures_context(deployment: Deployment, fetch: bool = True) -> dict:
    """The live figures card of a deployment's page (a version's page: its deployment's). Without
    `fetch`, a placeholder that asks for them as soon as the page has loaded."""
    root = deployment.root
    poll = f"every {FIGURES_SECONDS}s"
    context = {
        "deployment": deployment,
        "figures_root": root,
        "figures_seconds": FIGURES_SECONDS,
        "figures_poll": False,
        "figures_trigger": poll,
    }
    if root.target != Deployment.Target.LOCAL:
        return context | cloud_figures(root, fetch)
    if root.status in (Deployment.Status.STOPPING, Deployment.Status.STOPPED, Deployment.Status.FAILED):
        return context | {"figures_state": "over"}  # no poll: nothing calls it any more
    context["figures_poll"] = True
    if not fetch:
        return context | {"figures_state": "loading", "figures_trigger": f"load, {poll}"}
    if root.status != Deployment.Status.READY:
        return context | {"figures_state": "waiting"}
    try:
        found = client.figures(root.public_id).get(str(root.public_id), {})
    except client.RuntimeUnavailable:
        return context | {"figures_state": "unavailable"}
    serving = root.serving_id or root.pk
    versions = found.get("versions", {})
    rows = [figures_row("total", "Its URL (all versions)", found.get("total"))]
    rows += [
        figures_row(
            f"v{v.version}",
            f"v{v.version}",
            versions.get(str(v.version)),
            serving=v.pk == serving,
            canary=root.canary_percent if v.pk == root.canary_id else None,
        )
        for v in root.all_versions()
        if str(v.version) in versions or v.status == Deployment.Status.READY
    ]
    return context | {"figures_state": "live", "figures_rows": rows, "figures_charts": charts(found.get("last_hour"))}


def cloud_figures(root: Deployment, fetch: bool) -> dict:
    """An aws deployment's figures, read from CloudWatch once when its page has loaded (never
    polled: each read is a billed AWS call, and Lambda's metrics lag a minute anyway). When
    CloudWatch does not answer, the card says where the figures are."""
    if root.status != Deployment.Status.READY or not root.function_arn:
        return {"figures_state": "aws"}
    if not fetch:
        return {"figures_state": "loading", "figures_poll": True, "figures_trigger": "load"}
    versions = [v for v in root.all_versions() if v.status == Deployment.Status.READY]
    try:
        found = targets.get(root.target).load().figures(root, versions)
    except StageError as exc:  # TransientStageError too: the page says where to look instead
        return {"figures_state": "aws", "figures_problem": str(exc)}
    serving = root.serving_id or root.pk
    rows = [{"key": "total", "label": "Its URL (all versions)", **found["total"]}]
    rows += [
        {
            "key": f"v{v.version}",
            "label": f"v{v.version} (Lambda version {v.lambda_version})",
            "serving": v.pk == serving,
            "canary": root.canary_percent if v.pk == root.canary_id else None,
            **found["versions"][v.version],
        }
        for v in versions
        if v.version in found["versions"]
    ]
    return {"figures_state": "cloudwatch", "cloud_rows": rows}


def charts(last_hour: list[dict] | None, width: int = 240, height: int = 40) -> list[dict]:
    """The last hour, minute by minute, as three small SVG lines drawn here: each poll redraws them."""
    if not last_hour or len(last_hour) < 2:
        return []
    drawn = []
    for key, label, scale, unit in (
        ("requests_per_second", "requests/s", 1, ""),
        ("p99_seconds", "p99", 1000, " ms"),
        ("errors", "errors/min", 1, ""),
    ):
        values = [(point[key] or 0) * scale for point in last_hour]
        top, step = max(values) or 1, width / (len(values) - 1)
        points = " ".join(f"{i * step:.1f},{height - value / top * height:.1f}" for i, value in enumerate(values))
        drawn.append(
            {
                "key": key,
                "label": label,
                "points": points,
                "peak": max(values),
                "now": round(values[-1], 6),
                "unit": unit,
            }
        )
    return drawn


def figures_row(key: str, label: str, figures: dict | None, serving: bool = False, canary: int | None = None) -> dict:
    row = {"key": key, "label": label, "serving": serving, "canary": canary, "requests": None}
    if not figures:
        return row  # not called since the runtime started
    milliseconds = {name: figures[f"{name}_seconds"] for name in ("p50", "p99")}
    return row | {
        "requests": figures["requests"],
        "rows": figures.get("rows"),
        "rpm": figures["requests_per_minute"],
        "error_rate": None if figures["error_rate"] is None else figures["error_rate"] * 100,
        "errors_4xx": figures["errors_4xx"],
        "errors_5xx": figures["errors_5xx"],
        **{f"{name}_ms": None if value is None else value * 1000 for name, value in milliseconds.items()},
        "last": datetime.fromtimestamp(figures["last_request"], UTC) if figures["last_request"] else None,
    }


@login_required
@require_POST
def deployment_stop(request, public_id):
    deployment = own_deployment(request, public_id)
    if deployment.can_stop():
        try:
            summary = services.deployment_request_stop(deployment=deployment)
        except StageError as exc:
            messages.error(request, f"Stopping failed, nothing was marked stopped: {exc}")
        else:
            if deployment.status == Deployment.Status.STOPPING:
                messages.info(request, f"Stopping: {summary}.")
            else:
                messages.success(request, f"The deployment was stopped; its URL no longer answers ({summary}).")
    return redirect(deployment)


@login_required
@require_POST
def deployment_version_create(request, public_id):
    """The page's new-version form: the same checks as a new deployment; the current version keeps serving."""
    root = own_deployment(request, public_id)
    form = bound_form(request, VersionForm)
    if form.is_valid():
        try:
            version = form.create_version(root=root)
        except services.VersionRefused as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Version {version.version} uploaded: it deploys while the current one serves.")
            return redirect(root)
    return render(request, "deployments/detail.html", detail_context(root, version_form=form), status=400)


def version_action(request, action, said, **arguments) -> HttpResponse:
    """Run a version action of services (promote, canary, shadow: start or end) and go back to the
    deployment's page, saying what `said(version)` says, or why VersionRefused refused it."""
    try:
        version = action(**arguments)
    except services.VersionRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, said(version))
    return redirect(arguments["root"])


@login_required
@require_POST
def deployment_version_promote(request, public_id, number):
    """Promote a ready version, or roll back to an earlier one: the stable URL answers with it at once."""
    root = own_deployment(request, public_id)
    return version_action(
        request,
        services.deployment_version_promote,
        lambda version: f"Version {number} now serves {root.endpoint_url}.",
        root=root,
        number=number,
    )


@login_required
@require_POST
def deployment_version_canary(request, public_id, number):
    """Start a canary (or change its share): the version answers that percent of the URL's requests."""
    root = own_deployment(request, public_id)
    try:
        percent = int(request.POST.get("percent", ""))
    except ValueError:
        messages.error(request, "A canary takes a whole number of percent, from 1 to 50.")
        return redirect(root)
    return version_action(
        request,
        services.deployment_canary_start,
        lambda version: f"Version {number} answers {percent}% of the requests to {root.endpoint_url}.",
        root=root,
        number=number,
        percent=percent,
    )


@login_required
@require_POST
def deployment_canary_end(request, public_id):
    """Cancel the canary: the serving version answers every request again."""
    return version_action(
        request,
        services.deployment_canary_end,
        lambda version: f"Canary of version {version.version} ended: the serving version answers all.",
        root=own_deployment(request, public_id),
    )


@login_required
@require_POST
def deployment_version_delete(request, public_id, number):
    """Delete a version nothing routes to: it stops, and its files are deleted (its row and events stay)."""
    root = own_deployment(request, public_id)
    version = None if root.version_of_id else services.deployment_version_get(root=root, number=number)
    if version is None:
        messages.error(request, f"This deployment has no version {number}.")
        return redirect(root)
    try:
        summary = services.deployment_version_delete(version=version, by_user=request.user)
    except services.VersionRefused as exc:
        messages.error(request, str(exc))
    except StageError as exc:
        messages.error(request, f"Deleting version {number} failed, it was not marked stopped: {exc}")
    else:
        messages.success(request, f"Version {number} deleted: {summary}.")
    return redirect(root)


def shadow_report(root: Deployment) -> dict | None:
    """What comparing the shadowed candidate with the serving version found so far, for its row;
    {"unavailable": True} when the runtime does not answer (the page carries on)."""
    if not root.shadow_id or root.status != Deployment.Status.READY:
        return None
    try:
        report = client.shadow_report(root.public_id)
    except client.RuntimeUnavailable:
        return {"unavailable": True}
    return report or {"compared": 0, "agreed": 0, "examples": []}


@login_required
@require_POST
def deployment_version_shadow(request, public_id, number):
    """Shadow a candidate: it also predicts a sample of the live requests, and the page says how often it agreed."""
    return version_action(
        request,
        services.deployment_shadow_start,
        lambda version: f"Version {number} is shadowed: it also predicts a sample of the live requests.",
        root=own_deployment(request, public_id),
        number=number,
    )


@login_required
@require_POST
def deployment_shadow_end(request, public_id):
    return version_action(
        request,
        services.deployment_shadow_end,
        lambda version: f"Shadow of version {version.version} ended.",
        root=own_deployment(request, public_id),
    )


def endpoint_refusal(deployment: Deployment, key: str) -> str | None:
    """Why the page cannot call the deployment's endpoint with `key` (may be ""), or None."""
    if deployment.status != Deployment.Status.READY:
        return "This deployment is not ready."
    if not deployment.endpoint_url:
        return (
            "On AWS a version has no URL of its own: promote it (or send it a share as a canary) and call its "
            "deployment's URL."
        )
    if key and not (key.isascii() and key.isprintable()):
        return "That is not an API key: keys start with sml_ and hold only letters, digits, - and _."
    if deployment.target != Deployment.Target.LOCAL and deployment.is_private and not key:
        # Only the local runtime takes ServeML's own token; ServeML keeps no key of the
        # owner's (only digests), so it cannot call a private cloud endpoint on its own.
        return (
            "This endpoint is private: paste one of its API keys in the key field "
            "(ServeML keeps only their digests, so it cannot call it for you)."
        )
    return None


def endpoint_headers(deployment: Deployment, key: str) -> dict:
    """The headers the page calls the deployment's endpoint with: the runtime's own, and `key` as a Bearer token."""
    return {**client.server_side_headers(deployment), **({"Authorization": f"Bearer {key}"} if key else {})}


@login_required
@require_POST
def deployment_try(request, public_id):
    """The page's try-it form: send the JSON to the real endpoint and show what it answered."""
    deployment = own_deployment(request, public_id)
    body = request.POST.get("body", "")
    key = request.POST.get("key", "").strip()
    refusal = endpoint_refusal(deployment, key)
    if refusal:
        answer, status = refusal, None
    else:
        try:
            response = httpx.post(
                client.server_side_url(deployment),
                content=body.encode(),
                headers={"Content-Type": "application/json", **endpoint_headers(deployment, key)},
                timeout=settings.SERVEML_PREDICT_TIMEOUT_S + 5,
            )
            status, answer = response.status_code, response.text
        except httpx.HTTPError as exc:
            status, answer = None, f"The endpoint did not answer: {exc}"
    return render(request, "deployments/_try_result.html", {"status": status, "answer": answer})


def csv_refusal(message: str, status: int = 400) -> HttpResponse:
    return HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")


@login_required
@require_POST
def deployment_predict_csv(request, public_id):
    """The page's CSV form: check the whole upload, then stream it back predicted in batches
    through the same endpoint as the try-it form. A file that does not fit the model is
    refused up front with its first errors by line number; see deployments/csvbatch.py."""
    deployment = own_deployment(request, public_id)
    limit = settings.SERVEML_MAX_CSV_BYTES
    too_large = f"The CSV file is larger than {limit / 1024**2:.0f} MB: split it into smaller files."
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + 1024**2:
        return csv_refusal(too_large, 413)
    upload = request.FILES.get("csv_file")  # a temporary file, cut off past the limit (uploads.py)
    key = request.POST.get("key", "").strip()
    if "csv_file" in getattr(request, "oversized_uploads", {}):
        return csv_refusal(too_large, 413)
    refusal = endpoint_refusal(deployment, key)
    if deployment.status != Deployment.Status.READY:
        return csv_refusal(refusal, 409)
    if upload is None:
        return csv_refusal("Choose a CSV file to predict.")
    if refusal:
        return csv_refusal(refusal)
    serving = deployment.serving_version()
    signature = serving.model_signature
    example = (serving.example_request or {}).get("data")
    try:
        layout = csvbatch.check(upload.file, signature, example, max_lines=settings.SERVEML_CSV_MAX_LINES)
    except csvbatch.CsvRefused as exc:
        return csv_refusal("Nothing was predicted: the file does not fit the model.\n" + "\n".join(exc.lines()))
    endpoint = csvbatch.Endpoint(
        client.server_side_url(deployment),
        endpoint_headers(deployment, key),
        timeout=settings.SERVEML_PREDICT_TIMEOUT_S + 5,
    )
    probabilities = request.POST.get("probabilities") == "1" and "predict_proba" in signature.methods

    def body():
        try:
            yield from csvbatch.predict_lines(
                upload.file,
                layout,
                endpoint,
                probabilities=probabilities,
                classes=signature.classes,
                batch_rows=settings.SERVEML_CSV_BATCH_ROWS,
                max_lines=settings.SERVEML_CSV_MAX_LINES,
            )
        finally:
            endpoint.close()

    response = StreamingHttpResponse(body(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="predictions.csv"'
    response["X-ServeML-Rows"] = str(layout.rows)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def deployment_key_create(request, public_id):
    """Create an API key and show it once, in this response only (never stored, never in a cookie)."""
    deployment = own_deployment(request, public_id)
    try:
        key, raw = services.deployment_key_create(deployment=deployment, name=request.POST.get("name", ""))
    except services.KeyRefused as exc:
        messages.error(request, str(exc))
        return redirect(deployment)
    deployment.refresh_from_db()
    return render(request, "deployments/detail.html", detail_context(deployment, new_key=raw, new_key_row=key))


@login_required
@require_POST
def deployment_key_revoke(request, public_id, key_id):
    deployment = own_deployment(request, public_id)
    key = get_object_or_404(deployment.keys, pk=key_id)
    services.deployment_key_revoke(key=key)
    messages.success(request, f"API key {key} was revoked; calls with it are refused from now on.")
    return redirect(deployment)


@login_required
@require_POST
def deployment_access(request, public_id):
    deployment = own_deployment(request, public_id)
    private = request.POST.get("private") == "1"
    if private and not deployment.active_keys().exists():
        messages.error(request, "Create an API key first: a private endpoint with no keys answers nobody.")
    else:
        services.deployment_set_private(deployment=deployment, private=private)
    return redirect(deployment)
