"""The aws target's container image: build the Lambda image from the package
stage's context (its build stage), and push an image to a registry (aws.push
gives it the deployment's ECR repository and a login). Docker only, no AWS calls.

The build is hermetic: dependencies are installed here, on the worker, for
the Lambda platform (binary wheels only), copied into the context, and
`docker build` runs with no network at all.
"""

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import docker
from django.conf import settings

from deployments.builds import restore_context
from deployments.environments import uv_binary, uv_env
from deployments.models import Deployment
from deployments.pipeline.errors import StageError, TransientStageError

# What a Lambda function never needs at run time.
TRIM_DIRS = {"tests", "__pycache__"}  # not "testing": numpy.testing is imported at run time
TRIM_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "WHEEL"}
MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}
LOG_FLUSH_SECONDS = 1.0


def docker_client() -> docker.DockerClient:
    try:
        if settings.SERVEML_DOCKER_URL:
            return docker.DockerClient(base_url=settings.SERVEML_DOCKER_URL, timeout=900)
        return docker.from_env(timeout=900)
    except docker.errors.DockerException as exc:
        raise StageError(
            f"The worker cannot reach a Docker engine ({exc}). Start Docker on the worker host or set "
            "SERVEML_DOCKER_URL."
        ) from None


# The settings that shape the image besides the build context: its base, and the
# platform and index its dependencies are installed for.
IMAGE_SETTINGS = (
    "SERVEML_LAMBDA_BASE_IMAGE",
    "SERVEML_LAMBDA_ARCHITECTURE",
    "SERVEML_LAMBDA_MANYLINUX",
    "SERVEML_LAMBDA_PYTHON_VERSION",
    "SERVEML_PACKAGE_INDEX_URL",
)


def image_tag(deployment: Deployment) -> str:
    """A sha256 of everything that goes into the image: every file of the build context
    (handler, loader, serveml.json, Dockerfile, requirements.txt, model) and IMAGE_SETTINGS.

    Same inputs, same tag: a redeploy reuses the image. A new handler, new requirements
    or another base image make a new tag, so they reach the redeployed function."""
    context = restore_context(deployment)
    digest = hashlib.sha256()
    for name in IMAGE_SETTINGS:
        digest.update(f"{name}={getattr(settings, name)}\n".encode())
    # deps/ is not an input: install_lambda_dependencies makes it from requirements.txt and the settings.
    files = sorted(
        path for path in context.rglob("*") if path.is_file() and path.relative_to(context).parts[0] != "deps"
    )
    for path in files:
        digest.update(f"{path.relative_to(context).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(block)
    return digest.hexdigest()


def local_tag(deployment: Deployment) -> str:
    return f"serveml/{deployment.public_id}:{image_tag(deployment)[:32]}"


def install_lambda_dependencies(deployment: Deployment, target: Path) -> str:
    """uv installs the requirements for the Lambda platform into `target`, then trims it."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    architecture = settings.SERVEML_LAMBDA_ARCHITECTURE
    platform = f"{MACHINES[architecture]}-{settings.SERVEML_LAMBDA_MANYLINUX}"
    command = [
        uv_binary(),
        "pip",
        "install",
        "--target",
        str(target),
        "--no-progress",
        "--python-platform",
        platform,
        "--python-version",
        settings.SERVEML_LAMBDA_PYTHON_VERSION,
        "--only-binary",
        ":all:",
        "-r",
        str(restore_context(deployment) / "requirements.txt"),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=uv_env(), timeout=settings.SERVEML_ENV_INSTALL_TIMEOUT_S
    )
    if done.returncode != 0:
        raise StageError(
            f"Installing requirements.txt for Lambda ({architecture}) failed: every package needs a binary wheel "
            f"for Python {settings.SERVEML_LAMBDA_PYTHON_VERSION} on {platform}. Recent releases (scikit-learn "
            "1.8 and later, say) publish no manylinux2014 wheels for the python:3.11 image's Amazon Linux 2: "
            "pin an older release, or have an operator use an Amazon Linux 2023 base image with "
            "SERVEML_LAMBDA_MANYLINUX=manylinux_2_28.\n" + "\n".join(done.stderr.strip().splitlines()[-6:])
        )
    trimmed = trim(target)
    return f"dependencies for Lambda {architecture} installed ({trimmed // 1024**2} MB trimmed)"


def trim(root: Path) -> int:
    """Remove tests, caches and install metadata the runtime never reads; returns bytes saved."""
    saved = 0
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.exists():
            continue
        drop = (
            (path.is_dir() and path.name in TRIM_DIRS)
            or path.suffix in {".pyc", ".pyx", ".pxd", ".c", ".h"}
            or (path.parent.name.endswith(".dist-info") and path.name in TRIM_DIST_INFO)
        )
        if drop:
            if path.is_dir():
                saved += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            else:
                saved += path.stat().st_size
                path.unlink()
    return saved


class BuildLog:
    """Streams `docker build` output into the event log, a few lines at a time."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.lines: list[str] = []
        self.flushed = time.monotonic()

    def add(self, line: str) -> None:
        line = line.rstrip()
        if line:
            self.lines.append(line)
        if self.lines and time.monotonic() - self.flushed > LOG_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.deployment.record_event(stage=Deployment.Stage.BUILD, message="\n".join(self.lines)[-4000:])
        self.lines = []
        self.flushed = time.monotonic()


def build(deployment: Deployment) -> str:
    client = docker_client()
    tag = local_tag(deployment)
    try:
        image = client.images.get(tag)
        deployment.update(image_size_bytes=image.attrs["Size"])
        return f"reused image {tag} ({image.attrs['Size'] / 1024**2:.0f} MB): the same build inputs as before"
    except docker.errors.ImageNotFound:
        pass
    context = restore_context(deployment)
    installed = install_lambda_dependencies(deployment, context / "deps")
    deployment.record_event(stage=Deployment.Stage.BUILD, message=installed)
    log = BuildLog(deployment)
    try:
        for chunk in client.api.build(
            path=str(context),
            tag=tag,
            network_mode="none",
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            platform=f"linux/{'amd64' if settings.SERVEML_LAMBDA_ARCHITECTURE == 'x86_64' else 'arm64'}",
        ):
            if "error" in chunk:
                log.flush()
                raise StageError(f"docker build failed: {chunk['error'].strip()}")
            log.add(chunk.get("stream", ""))
    except docker.errors.APIError as exc:
        log.flush()
        if exc.is_server_error():
            raise TransientStageError(f"the Docker engine failed during the build: {exc.explanation}") from None
        raise StageError(f"docker build failed: {exc.explanation}") from None
    log.flush()
    image = client.images.get(tag)
    deployment.update(image_size_bytes=image.attrs["Size"])
    return f"built {tag} with no network: {image.attrs['Size'] / 1024**2:.0f} MB"


def push_image(client: docker.DockerClient, source: str, repository: str, tag: str, auth: dict | None) -> str:
    """Tag `source` as repository:tag and push it; returns the pushed digest."""
    client.images.get(source).tag(repository, tag=tag)
    digest = ""
    try:
        for chunk in client.api.push(repository, tag=tag, auth_config=auth, stream=True, decode=True):
            if "error" in chunk:
                message = chunk["error"]
                if any(word in message.lower() for word in ("timeout", "connection reset", "503", "502")):
                    raise TransientStageError(f"the registry did not take the image: {message}")
                raise StageError(f"pushing the image failed: {message}")
            digest = chunk.get("aux", {}).get("Digest", digest)
    except docker.errors.APIError as exc:
        raise TransientStageError(f"the Docker engine failed during the push: {exc.explanation}") from None
    return digest
