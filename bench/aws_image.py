"""The aws target's Lambda image: what it adds to its base image, the size of the environment it
carries, and how long the build takes cold (no layer in Docker's cache) and warm (a second model
with the same requirements, whose dependency layer is cached).

Built as tests/test_docker.py builds it: in the tests' own dockerd (tests/docker_engine.py; started
here when it is not running, and stopped after), on the stand-in base image (Debian's python3.11,
made once with debootstrap), by the pipeline's own stages and `aws_image.build`. The section is
skipped, with the reason printed, when dockerd cannot start or the base image cannot be made.

The build runs in a child process (`python -m bench.aws_image`): Django there has a database of
its own, a fresh SQLite file, and the settings that point the build at that engine.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import LOGS, OUT, PYTHON, ROOT
from bench.load import Results, Setup

MB = 1024**2


def run_aws_image(results: Results, setup: Setup):
    try:
        from tests import docker_engine

        LOGS.mkdir(parents=True, exist_ok=True)
        started = docker_engine.ENGINE.start(LOGS / "dockerd.log")  # None: it was already running
    except Exception as exc:  # not installed, no permission, did not answer: all mean "skip"
        skip(results, f"dockerd cannot start: {exc}")
        return
    data_dir = Path(tempfile.mkdtemp(prefix="serveml-bench-aws-", dir=OUT))
    try:
        try:
            base = docker_engine.ensure_base_image(LOGS / "debootstrap.log")
        except Exception as exc:
            skip(results, f"the stand-in base image cannot be made ({exc}); see bench/out/logs/debootstrap.log")
            return
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "serveml.settings",
            "DJANGO_DEBUG": "1",
            "SERVEML_DATA_DIR": str(data_dir),
            "DATABASE_URL": f"sqlite:///{data_dir / 'bench.sqlite3'}",
            "SERVEML_DOCKER_URL": docker_engine.ENGINE.url,
            "SERVEML_LAMBDA_BASE_IMAGE": base,
            "SERVEML_LAMBDA_ARCHITECTURE": "x86_64",
            # The stand-in runs Debian bookworm (glibc 2.36): manylinux_2_28 wheels, as on Amazon Linux 2023.
            "SERVEML_LAMBDA_MANYLINUX": "manylinux_2_28",
        }
        subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], env=env, cwd=ROOT, check=True)
        with open(LOGS / "aws-image.log", "ab") as log:
            done = subprocess.run(
                [PYTHON, "-m", "bench.aws_image", setup.requirements, str(setup.models["lr"]), str(setup.models["rf"])],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=1800,
            )
        if done.returncode != 0:
            raise RuntimeError(f"the image build failed (exit {done.returncode}); see bench/out/logs/aws-image.log")
        results.aws_image = json.loads(done.stdout.strip().splitlines()[-1])
        figures = results.aws_image
        print(
            f"  base {figures['base_mb']:.0f} MB, image +{figures['added_mb']:.0f} MB, "
            f"Lambda environment {figures['lambda_environment_mb']:.0f} MB "
            f"(local one {figures['local_environment_mb']:.0f} MB); "
            f"build cold {figures['cold_build_s']:.1f} s, warm {figures['warm_build_s']:.1f} s",
            flush=True,
        )
    except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        results.aws_image = {"failed": str(exc)}
        print(f"  failed: {exc}", flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if started is not None:
            started.terminate()
            started.wait(60)


def skip(results: Results, reason: str) -> None:
    results.aws_image = {"skipped": reason}
    print(f"  skipped: {reason}", flush=True)


def size(path: Path) -> int:
    """Bytes in the files under `path` (what a COPY of it puts in a layer)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def build_images(requirements: str, cold_model: Path, warm_model: Path) -> dict:
    """In the child: two aws deployments with the same requirements, through the pipeline's stages
    up to the image, as test_docker.py runs them; their figures, and the images removed after."""
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.utils import timezone

    from deployments import services
    from deployments.builds import restore_context
    from deployments.environments import environment_path
    from deployments.pipeline import stages
    from deployments.targets import aws_image as image

    services._enqueue = lambda deployment: None  # no worker: the stages run here, one by one
    owner = User.objects.create(username="bench")
    client = image.docker_client()
    from django.conf import settings

    base = client.images.get(settings.SERVEML_LAMBDA_BASE_IMAGE).attrs["Size"]
    figures, tags = {"base_mb": base / MB}, []
    try:
        for when, model in (("cold", cold_model), ("warm", warm_model)):
            deployment = services.deployment_create(
                owner=owner,
                name=f"bench-{when}",
                target="local",
                model_format="pickle",
                model_upload=SimpleUploadedFile("model.pkl", model.read_bytes()),
                requirements_upload=SimpleUploadedFile("requirements.txt", requirements.encode()),
            )
            deployment.target = "aws"
            deployment.save()
            for stage in (stages.inspect, stages.environment, stages.validate, stages.package):
                stage(deployment)
            started, since = time.monotonic(), timezone.now()
            summary = image.build(deployment)  # installs deps/ for Lambda, then docker build
            figures[f"{when}_build_s"] = time.monotonic() - started
            # Of which installing deps/: until the event the build records once they are installed.
            installed = deployment.events.filter(stage="build", message__startswith="dependencies for Lambda").first()
            figures[f"{when}_install_s"] = (installed.created_at - since).total_seconds()
            tags.append(image.local_tag(deployment))
            if not summary.startswith("built"):
                raise RuntimeError(f"the {when} build did not build: {summary}")
            log = "\n".join(e.message for e in deployment.events.filter(stage="build"))
            # Honesty check: the cold build should take no layer from the cache, the warm one its deps/.
            figures[f"{when}_cached_steps"] = log.count("Using cache")
            if when == "cold":
                figures["image_mb"] = client.images.get(tags[-1]).attrs["Size"] / MB
                figures["added_mb"] = figures["image_mb"] - figures["base_mb"]
                figures["lambda_environment_mb"] = size(restore_context(deployment) / "deps") / MB
                figures["local_environment_mb"] = size(environment_path(deployment.environment_key)) / MB
    finally:
        for tag in tags:
            client.images.remove(tag, force=True)
    return figures


if __name__ == "__main__":  # the child: requirements text, then the cold and the warm model's pickles
    print(json.dumps(build_images(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
