"""A real Docker engine for the tests, and a stand-in for the Lambda base image.

Nothing can be pulled from Docker Hub or public ECR here, so the tests run
their own dockerd (vfs storage, no iptables, no bridge: what works as root on
a plain VM) and build the base image themselves: Debian bookworm's python3
(3.11, as in the Lambda image) made with debootstrap and `docker import`. The
engine's data root lives outside the checkout, so that image is built once per
machine and reused by later runs.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOCKET = Path("/run/serveml-test-docker.sock")
DATA_ROOT = Path("/var/lib/serveml-test-docker")
EXEC_ROOT = Path("/run/serveml-test-docker")
BASE_IMAGE = "serveml-test/lambda-python:3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def docker_url() -> str:
    return f"unix://{SOCKET}"


def _client():
    import docker

    return docker.DockerClient(base_url=docker_url(), timeout=600)


def _answers() -> bool:
    try:
        return _client().ping()
    except Exception:
        return False


def start_dockerd(log: Path) -> subprocess.Popen | None:
    """Start a dockerd of our own; None when one already answers on our socket."""
    if _answers():
        return None
    if not shutil.which("dockerd"):
        raise RuntimeError("dockerd is not installed: run `make test`, which installs Debian's docker.io")
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            "dockerd",
            "--host",
            docker_url(),
            "--data-root",
            str(DATA_ROOT),
            "--exec-root",
            str(EXEC_ROOT),
            "--pidfile",
            str(EXEC_ROOT) + ".pid",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _answers():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"dockerd did not start; see {log}")


def ensure_base_image(log: Path) -> str:
    """Build the stand-in Lambda base image unless the engine already has it."""
    import docker

    client = _client()
    try:
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="serveml-rootfs-") as root:
        with open(log, "ab") as out:
            subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", root, DEBIAN_MIRROR],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
            )
        shutil.rmtree(Path(root) / "var/cache/apt/archives", ignore_errors=True)
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar:
            subprocess.run(["tar", "-C", root, "-cf", tar.name, "."], check=True)
            client.api.import_image_from_file(
                tar.name,
                repository=BASE_IMAGE.split(":")[0],
                tag=BASE_IMAGE.split(":")[1],
                changes=["ENV LAMBDA_TASK_ROOT=/var/task", "WORKDIR /var/task", 'CMD ["python3"]'],
            )
    return BASE_IMAGE


if __name__ == "__main__":  # warm the cache by hand: python -m tests.docker_engine
    start_dockerd(Path("/tmp/serveml-dockerd.log"))
    print(ensure_base_image(Path("/tmp/serveml-debootstrap.log")))
