"""The stages every target shares. Each returns a one-line summary for the event log."""

import io
import json
import math
import re
import shutil
import tarfile
from pathlib import Path

import httpx
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from jinja2 import Environment as Jinja
from jinja2 import FileSystemLoader, StrictUndefined
from packaging.version import Version

from deployments import buildkit, sandbox, targets
from deployments.allowlist import allowed_packages, disallowed
from deployments.builds import build_dir, restore_context  # noqa: F401  (the pipeline's own names for them)
from deployments.environments import EnvironmentBuildError, ensure_environment, environment_path
from deployments.inspection import InspectionError, ScanResult, scan_model_file
from deployments.models import Deployment
from deployments.pipeline.errors import StageError
from deployments.requirements import Requirements, RequirementsError, parse_requirements
from deployments.runtime import client
from deployments.signatures import ProbeReport, SignatureError

jinja = Jinja(loader=FileSystemLoader(buildkit.TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)


def requirements_of(deployment: Deployment) -> Requirements:
    with deployment.requirements_file.open("rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    try:
        return parse_requirements(text, allowed_packages=allowed_packages())
    except RequirementsError as exc:
        raise StageError(f"requirements.txt: {exc}") from None


# ------------------------------------------------------------------ inspect


def inspect(deployment: Deployment) -> str:
    try:
        with deployment.model_file.open("rb") as handle:
            scan = scan_model_file(handle)
    except InspectionError as exc:
        raise StageError(str(exc)) from None
    refused = disallowed(scan.globals)
    names = ", ".join(str(g) for g in refused[:20])
    if refused and all(g.module.split(".")[0] == "sklearn" for g in refused):
        raise StageError(
            f"The model refers to scikit-learn names that ServeML does not know: {names}. Such paths usually "
            "come from an old scikit-learn (sklearn.svm.classes, for one, became sklearn.svm._classes in 0.22). "
            "Save the model again with a current scikit-learn and pin that version, or ask an operator to "
            "allow these names."
        )
    if refused:
        raise StageError(
            f"The model file would import {len(refused)} name(s) that are not on ServeML's allowlist of what "
            f"scikit-learn models need: {names}. Such imports can run arbitrary code, so ServeML refuses the file. "
            "If your model really needs them (your own transformer class, xgboost, lightgbm…), ask an operator "
            "to add them to SERVEML_EXTRA_ALLOWED_GLOBALS."
        )
    requirements = requirements_of(deployment)
    warning = check_versions(scan, requirements)
    if warning:
        deployment.record_event(stage=Deployment.Stage.INSPECT, message=warning, level="warning")
    deployment.update(
        model_format=scan.format,
        # The restricted loader resolves exactly these, and skops builds exactly these types:
        # whatever the scan did not see cannot be imported at load time either.
        allowed_globals=sorted([g.module, g.name] for g in scan.globals),
        pickled_sklearn_version=scan.sklearn_version or "",
    )
    saved = (
        f"saved with scikit-learn {scan.sklearn_version}"
        if scan.sklearn_version
        else "no scikit-learn version recorded"
    )
    return (
        f"{scan.format} file{f' ({scan.compression})' if scan.compression else ''}: "
        f"{len(scan.globals)} imported names, all on the allowlist; {saved}; "
        f"{len(requirements.items)} requirement(s) accepted"
    )


def check_versions(scan: ScanResult, requirements: Requirements) -> str:
    """Raise StageError when the pins cannot load the model; return a warning text or ''."""
    saved = scan.sklearn_version
    pin = requirements.get("scikit-learn")
    if pin is None:
        need = f"scikit-learn=={saved}" if saved else "scikit-learn==<the version you trained with>"
        raise StageError(f"requirements.txt does not list scikit-learn, which the model needs to load: add {need}.")
    warning = ""
    if saved and pin.version is None:
        warning = (
            f"scikit-learn is not pinned, so the newest release will be installed, but the model was saved with "
            f"{saved}. Pin scikit-learn=={saved} to get exactly the model you trained."
        )
    elif saved and pin.version:
        pinned, trained = Version(pin.version), Version(saved)
        if (pinned.major, pinned.minor) != (trained.major, trained.minor):
            raise StageError(
                f"requirements pin scikit-learn {pin.version} but the model was saved with {saved}. "
                f"Pin scikit-learn=={saved} (or any {trained.major}.{trained.minor}.x release), "
                "or save the model again with the version you pin."
            )
        if pinned != trained:
            warning = (
                f"requirements pin scikit-learn {pin.version}, the model was saved with {saved}: "
                "same minor release, usually compatible."
            )
    numpy_pin = requirements.get("numpy")
    if scan.uses_numpy2_layout and numpy_pin and numpy_pin.version and Version(numpy_pin.version).major < 2:
        raise StageError(
            f"the model was saved with numpy 2 (it refers to numpy._core) but requirements pin numpy "
            f"{numpy_pin.version}, which cannot load it (No module named 'numpy._core'). "
            "Pin numpy 2 (numpy==2.x) or save the model again with numpy 1."
        )
    return warning


# ------------------------------------------------------------------ environment


def environment(deployment: Deployment) -> str:
    try:
        env = ensure_environment(requirements_of(deployment))
    except EnvironmentBuildError as exc:
        raise StageError(str(exc)) from None
    deployment.update(environment_key=env.key)
    if env.reused:
        return f"reused environment {env.key[:12]} (same requirements as an earlier deployment: nothing installed)"
    return f"built environment {env.key[:12]} with uv from binary wheels in {env.seconds:.1f} s"


def environment_python(deployment: Deployment) -> Path:
    return environment_path(deployment.environment_key) / "bin" / "python"


# ------------------------------------------------------------------ validate


def local_model_path(deployment: Deployment) -> Path:
    """A local, read-only copy of the model file (storage may be S3)."""
    try:
        return Path(deployment.model_file.path)
    except NotImplementedError:
        target = settings.DATA_DIR / "cache" / str(deployment.public_id) / deployment.model_basename()
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with deployment.model_file.open("rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.chmod(0o444)
        return target


def handler_config(deployment: Deployment) -> dict:
    """serveml.json: what the handler and the probe need to load this model, and nothing else."""
    return {
        "deployment_id": str(deployment.public_id),
        "model_file": deployment.model_basename(),
        "format": deployment.model_format,
        "allowed_globals": deployment.allowed_globals,
        # The validated example row (none yet while validating): V2 metadata tells text columns by it.
        "example": (deployment.example_request or {}).get("data"),
    }


def validate_limits() -> sandbox.Limits:
    return sandbox.Limits(
        memory_bytes=settings.SERVEML_SANDBOX_MEMORY_BYTES, cpu_seconds=settings.SERVEML_SANDBOX_CPU_SECONDS
    )


def validate(deployment: Deployment) -> str:
    python = environment_python(deployment)
    model_name = deployment.model_basename()
    limits = validate_limits()
    try:
        launched = sandbox.launch(
            uid=sandbox.uid_for(deployment.pk),
            environment=python.parent.parent,
            args=["probe.py"],
            limits=limits,
            files={
                "probe.py": buildkit.PROBE,
                "serveml_loader.py": buildkit.LOADER,
                # In memory, not a temporary file: a worker killed here leaves nothing behind.
                buildkit.CONFIG_FILE: json.dumps(handler_config(deployment)).encode(),
                model_name: local_model_path(deployment),
            },
        )
        result = sandbox.run(launched, wall_seconds=settings.SERVEML_SANDBOX_WALL_SECONDS)
    except sandbox.SandboxUnavailable as exc:
        raise StageError(str(exc)) from None
    deployment.record_event(
        stage=Deployment.Stage.VALIDATE,
        message=f"sandbox: {sandbox.describe(limits)}",
        level="warning" if sandbox.is_disabled() else "info",
    )
    if result.timed_out:
        raise StageError(
            f"Loading and testing the model took longer than {settings.SERVEML_SANDBOX_WALL_SECONDS} s, "
            "so the sandbox stopped it. A model that loads this slowly cannot serve predictions."
        )
    try:
        raw = json.loads(result.stdout.decode() or "{}")
    except ValueError:
        raw = {}
    if not raw:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        if result.returncode and (result.returncode < 0 or result.returncode > 128):
            # bubblewrap passes a killed child on as 128 + the signal number
            signal_number = -result.returncode if result.returncode < 0 else result.returncode - 128
            reason = f"it was killed by signal {signal_number} (CPU or memory limit)"
        elif "MemoryError" in "".join(tail):
            reason = f"it ran out of its {settings.SERVEML_SANDBOX_MEMORY_BYTES // 1024**2} MiB memory limit"
        else:
            reason = f"it exited with code {result.returncode}: {' '.join(tail)[-400:]}"
        raise StageError(f"Loading the model in its sandbox failed: {reason}.")
    # The probe ran next to the user's code: its report is parsed, never taken as it is.
    try:
        report = ProbeReport.parse(raw)
    except SignatureError as exc:
        raise StageError(f"The model's sandbox answered with a report ServeML cannot accept ({exc}).") from None
    if report.error:
        if report.signature:
            deployment.update(signature=report.signature.as_json())
        raise StageError(report.error)
    signature = report.signature.with_outputs(report.outputs)
    deployment.update(
        signature=signature.as_json(),
        example_request={"data": report.example},
        example_response={"prediction": report.outputs["predict"], "model_type": signature.model_type},
    )
    return (
        f"{signature.model_type} loaded with scikit-learn {signature.sklearn_version}: {signature.features()}, "
        f"methods {', '.join(signature.methods)}; example prediction {json.dumps(report.outputs['predict'])}"
    )


# ------------------------------------------------------------------ package


def render_context(deployment: Deployment, directory: Path) -> list[str]:
    """Write the build context (handler, loader, serveml.json, Dockerfile, model, requirements).

    The handler is a plain module copied as it is; only the Dockerfile is rendered. Every
    file is world-readable and read-only, because a sandbox binds them without a copy;
    the folders above are ServeML's alone (0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    values = {
        "deployment_id": str(deployment.public_id),
        # The name lands in a Dockerfile comment: keep only harmless characters.
        "name": re.sub(r"[^\w .-]", "_", deployment.name)[:100],
        "model_filename": deployment.model_basename(),
        "base_image": settings.SERVEML_LAMBDA_BASE_IMAGE,
    }
    for name, source in buildkit.HANDLER_FILES.items():
        shutil.copyfile(source, directory / name)
    (directory / buildkit.CONFIG_FILE).write_text(json.dumps(handler_config(deployment), indent=1))
    (directory / "Dockerfile").write_text(jinja.get_template("Dockerfile.j2").render(values))
    with deployment.model_file.open("rb") as src, open(directory / values["model_filename"], "wb") as dst:
        shutil.copyfileobj(src, dst)
    (directory / "requirements.txt").write_text(requirements_of(deployment).normalised())
    names = [*buildkit.HANDLER_FILES, buildkit.CONFIG_FILE, "Dockerfile", values["model_filename"], "requirements.txt"]
    for name in names:
        (directory / name).chmod(0o444)
    return names


def package(deployment: Deployment) -> str:
    directory = build_dir(deployment)
    shutil.rmtree(directory, ignore_errors=True)
    names = render_context(deployment, directory)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            archive.add(directory / name, arcname=name)
    artifact = f"deployments/{deployment.public_id}/build-context.tar.gz"
    if default_storage.exists(artifact):
        default_storage.delete(artifact)
    default_storage.save(artifact, ContentFile(buffer.getvalue()))
    deployment.update(artifact=artifact)
    return f"build context ({', '.join(names)}; {len(buffer.getvalue()) // 1024 + 1} KB) stored as {artifact}"


# ------------------------------------------------------------------ verify


def same_prediction(expected, actual) -> bool:
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            same_prediction(e, a) for e, a in zip(expected, actual, strict=True)
        )
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return math.isclose(float(expected), float(actual), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return expected == actual


def verify(deployment: Deployment) -> str:
    # The target says what the call may carry: the runtime's token stays on this host, and a
    # private Lambda answers only its keys (see aws.verify_headers).
    target = targets.get(deployment.target)
    with target.verify_headers(deployment) as (headers, note):
        summary = _verify_call(deployment, headers, target.verify_post(deployment) or httpx.post)
    return summary + note


def _verify_call(deployment: Deployment, headers: dict, post) -> str:
    try:
        response = post(
            client.server_side_url(deployment),
            json=deployment.example_request,
            headers=headers,
            timeout=60,
        )
    except httpx.HTTPError as exc:
        raise StageError(f"The endpoint {deployment.endpoint_url} did not answer: {exc}.") from None
    if response.status_code != 200:
        raise StageError(f"The endpoint answered {response.status_code} to the example request: {response.text[:300]}")
    answer = response.json()
    expected = deployment.example_response["prediction"]
    if not same_prediction(expected, answer.get("prediction")):
        raise StageError(
            f"The endpoint predicted {answer.get('prediction')!r} for the example input, but the model "
            f"itself predicted {expected!r} during validation."
        )
    return f"endpoint answered the example request with the validated prediction {json.dumps(expected)}"
