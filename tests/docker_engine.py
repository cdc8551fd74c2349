"""A real Docker engine for the tests, and a stand-in for the Lambda base image.

Nothing can be pulled from Docker Hub or public ECR here, so the tests run
their own dockerd (no iptables, no bridge: what works as root on a plain VM;
test_compose.py starts a second one with another storage driver, see `Engine`)
and build the base image themselves: Debian bookworm's python3
(3.11, as in the Lambda image) made with debootstrap and `docker import`. The
engine's data root lives outside the checkout, so that image is built once per
machine and reused by later runs.
"""

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BASE_IMAGE = "serveml-test/lambda-python:3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Engine:
    """A dockerd of the tests' own: where it listens, keeps its images and runs, and its storage driver."""

    socket: Path
    data_root: Path
    exec_root: Path
    storage_driver: str

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self, timeout: float = 600):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def answers(self) -> bool:
        try:
            return self.client().ping()
        except Exception:
            return False

    def start(self, log: Path) -> subprocess.Popen | None:
        """Start this dockerd and wait until it answers; None when it already answers on its socket
        (left by a run that was killed)."""
        if self.answers():
            return None
        if not shutil.which("dockerd"):
            raise RuntimeError("dockerd is not installed: run `make test`, which installs Debian's docker.io")
        self.data_root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [
                "dockerd",
                "--host",
                self.url,
                "--data-root",
                str(self.data_root),
                "--exec-root",
                str(self.exec_root),
                "--pidfile",
                f"{self.exec_root}.pid",
                f"--storage-driver={self.storage_driver}",
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
            if self.answers():
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not start; see {log}")


# The engine test_docker.py builds the aws target's images in.
ENGINE = Engine(
    socket=Path("/run/serveml-test-docker.sock"),
    data_root=Path("/var/lib/serveml-test-docker"),
    exec_root=Path("/run/serveml-test-docker"),
    storage_driver="vfs",
)


def ensure_base_image(log: Path) -> str:
    """Build the stand-in Lambda base image unless the engine already has it."""
    import docker

    client = ENGINE.client()
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
    ENGINE.start(Path("/tmp/serveml-dockerd.log"))
    print(ensure_base_image(Path("/tmp/serveml-debootstrap.log")))
