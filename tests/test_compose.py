"""docker-compose.yml as the production recipe, and ServeML's own image.

What is checked here: the compose file's promises (debug off, secrets only from .env,
restart policies and healthchecks everywhere, the reaper, a Docker engine for the
worker, what the sandbox needs), that `docker compose config` accepts it, that the
Dockerfile builds, that the web and runtime processes start in the image and pass the
compose healthchecks, and that the sandbox starts there with the privileges compose asks
for (and not without).

What cannot be checked here: nothing can be pulled, so the image builds on a stand-in
base (Debian bookworm's python3, like python:3.11-slim's Debian) that already holds
bubblewrap and util-linux (so the Dockerfile's apt step is skipped), and pip installs
requirements.txt from a wheelhouse instead of PyPI (the build has no network); redis:7,
postgres:16 and docker:dind cannot be pulled, so `docker compose up`, the worker and beat
against a real broker, and the healthchecks of worker, beat, redis, postgres and docker
are not run. AppArmor is not active on this machine, so only the other half of
`security_opt` is proven needed here.
"""

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import docker_engine
from tests.conftest import OUTPUT, ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]
SERVEML_SERVICES = ("web", "worker", "beat", "runtime")
SANDBOXED = ("worker", "runtime")
SECRETS = {"DJANGO_SECRET_KEY": "test-secret-key-" + "x" * 40, "POSTGRES_PASSWORD": "test-db-password"}


def env_file(directory: Path, **changes) -> Path:
    """.env.example with its required secrets filled in, as an operator would."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if not line.startswith("#") and name in {**SECRETS, **changes}:
            value = changes.get(name, SECRETS.get(name))
            if value is None:
                continue
            line = f"{name}={value}"
        lines.append(line)
    path = directory / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ the compose file


def test_it_runs_every_process_of_make_run_with_its_databases_and_a_docker_engine():
    assert set(SERVICES) == {"web", "worker", "beat", "runtime", "redis", "postgres", "docker"}
    assert SERVICES["beat"]["command"].startswith("celery -A serveml beat")
    assert SERVICES["worker"]["command"].startswith("celery -A serveml worker")
    assert SERVICES["worker"]["environment"]["SERVEML_DOCKER_URL"] == "tcp://docker:2375"
    assert SERVICES["worker"]["depends_on"]["docker"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_restarts_by_itself_and_has_a_healthcheck(service):
    assert SERVICES[service]["restart"] == "unless-stopped"
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and check["interval"] and check["retries"]


@pytest.mark.parametrize("service", SERVEML_SERVICES)
def test_debug_is_off_and_secrets_come_only_from_the_env_file(service):
    config = SERVICES[service]
    assert config["environment"]["DJANGO_DEBUG"] == "0"
    assert config["env_file"] == ".env"
    assert not {"DJANGO_SECRET_KEY", "SERVEML_RUNTIME_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(config["environment"])
    assert "${POSTGRES_PASSWORD:?" in config["environment"]["DATABASE_URL"]


def test_no_secret_is_written_in_the_compose_file_and_the_example_asks_for_them():
    text = COMPOSE_FILE.read_text()
    assert "change-me" not in text and "serveml:serveml@" not in text
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    example = (ROOT / ".env.example").read_text().splitlines()
    assert "DJANGO_SECRET_KEY=" in example and "POSTGRES_PASSWORD=" in example  # empty: the operator sets them
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()  # never baked into the image


@pytest.mark.parametrize("service", SERVEML_SERVICES)
def test_only_the_worker_and_the_runtime_get_what_the_sandbox_needs(service):
    config = SERVICES[service]
    if service in SANDBOXED:
        assert config["user"] == "root" and set(config["cap_add"]) == {"SYS_ADMIN", "NET_ADMIN"}
        assert set(config["security_opt"]) == {"seccomp=unconfined", "apparmor=unconfined"}
        assert "privileged" not in config
    else:
        assert "privileged" not in config and "cap_add" not in config and "security_opt" not in config


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install docker-compose)")


def compose_config(directory: Path) -> subprocess.CompletedProcess:
    shutil.copy(COMPOSE_FILE, directory / "docker-compose.yml")
    (directory / "Dockerfile").touch()  # the build context must exist; nothing is built here
    return subprocess.run([*compose_command(), "config"], cwd=directory, capture_output=True, text=True, timeout=60)


def test_compose_accepts_the_file_with_the_example_env_filled_in(tmp_path):
    env_file(tmp_path)
    done = compose_config(tmp_path)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)["services"]
    assert rendered["web"]["environment"]["DJANGO_SECRET_KEY"] == SECRETS["DJANGO_SECRET_KEY"]
    assert rendered["worker"]["environment"]["DATABASE_URL"] == (
        f"postgresql://serveml:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/serveml"
    )
    # .env cannot switch debug on: the compose file's own environment wins.
    env_file(tmp_path, DJANGO_DEBUG="1")
    assert yaml.safe_load(compose_config(tmp_path).stdout)["services"]["web"]["environment"]["DJANGO_DEBUG"] == "0"


def test_compose_refuses_to_start_without_the_database_password(tmp_path):
    env_file(tmp_path, POSTGRES_PASSWORD=None)
    done = compose_config(tmp_path)
    assert done.returncode != 0 and "set POSTGRES_PASSWORD in .env" in done.stderr


# ------------------------------------------------------------------ the image

# A Docker engine of this module's own, apart from the one test_docker.py starts and stops
# (neither stops the other's in mid-build). overlay2, not vfs: vfs copies the whole 1 GB image
# for every layer and every container, minutes each on this 2-core machine.
ENGINE = docker_engine.Engine(
    socket=Path("/run/serveml-compose-docker.sock"),
    data_root=Path("/var/lib/serveml-compose-docker"),
    exec_root=Path("/run/serveml-compose-docker"),
    storage_driver="overlay2",
)


def requirements_digest() -> str:
    return hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:12]


def stand_in_base(client, log: Path) -> str:
    """python:3.11-slim cannot be pulled here: Debian bookworm's python3 (3.11 too) with the
    sandbox's tools, and a wheelhouse of requirements.txt for pip, since the build has no network.

    Tagged by requirements.txt, so it is made once per machine and per set of pins."""
    import docker

    tag = f"serveml-test/serveml-base:{requirements_digest()}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="serveml-base-") as root, open(log, "ab") as out:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,bubblewrap,util-linux",
                "bookworm",
                root,
                docker_engine.DEBIAN_MIRROR,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
        shutil.rmtree(Path(root) / "var/cache/apt/archives", ignore_errors=True)
        subprocess.run(  # on this host, which reaches the package index; the same Python 3.11 and platform
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--only-binary",
                ":all:",
                "-r",
                str(ROOT / "requirements.txt"),
                "-d",
                str(Path(root) / "wheelhouse"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=600,
        )
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar:
            subprocess.run(["tar", "-C", root, "-cf", tar.name, "."], check=True)
            repository, version = tag.split(":")
            client.api.import_image_from_file(tar.name, repository=repository, tag=version, changes=['CMD ["python3"]'])
    return tag


@pytest.fixture(scope="module")
def image():
    """ServeML's image, built from the repository's Dockerfile on the stand-in base with no network."""
    OUTPUT.joinpath("logs").mkdir(parents=True, exist_ok=True)
    if not shutil.which("dockerd"):
        pytest.skip("dockerd is not installed: run `make test`, which installs Debian's docker.io")
    proc = ENGINE.start(OUTPUT / "logs" / "compose-dockerd.log")
    client = ENGINE.client(timeout=900)
    base = stand_in_base(client, OUTPUT / "logs" / "serveml-base.log")
    tag = f"serveml-test/serveml:{requirements_digest()}"
    log = []
    for chunk in client.api.build(
        path=str(ROOT),
        tag=tag,
        network_mode="none",
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
        buildargs={"BASE_IMAGE": base, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheelhouse"},
    ):
        log.append(chunk.get("stream", ""))
        assert "error" not in chunk, "".join(log)[-3000:] + chunk["error"]
    yield client, tag
    client.images.remove(tag, force=True)
    client.close()
    if proc is not None:
        proc.terminate()
        proc.wait(60)


def run(image, command: list[str], **options) -> str:
    client, tag = image
    environment = {
        "DJANGO_SETTINGS_MODULE": "serveml.settings",
        "DJANGO_SECRET_KEY": SECRETS["DJANGO_SECRET_KEY"],
        "DJANGO_DEBUG": "0",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
    }
    return client.containers.run(
        tag, command, environment=environment, network_disabled=True, remove=True, stdout=True, stderr=True, **options
    ).decode()


def healthcheck(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    return test[1] if test[0] == "CMD-SHELL" else shlex.join(test[1:])


@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first of these builds the stand-in base and the image
def test_serveml_image_has_the_sandbox_tools_and_passes_the_deploy_checks(image):
    tools = run(image, ["sh", "-c", "for tool in bwrap prlimit setpriv unshare; do command -v $tool; done"]).split()
    assert [Path(tool).name for tool in tools] == ["bwrap", "prlimit", "setpriv", "unshare"]
    checked = run(image, ["python", "manage.py", "check", "--deploy"])
    assert "System check identified" in checked  # exit status 0: no error-level finding


@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first of these builds the stand-in base and the image
def test_web_and_runtime_start_in_the_image_and_pass_their_compose_healthchecks(image):
    # The web service's command (migrate, then gunicorn) and the runtime's, on loopback,
    # then each service's own healthcheck from docker-compose.yml, until both pass.
    script = (
        "python manage.py migrate --noinput >/dev/null && "
        "(gunicorn serveml.wsgi -b 127.0.0.1:8000 -w 1 >/tmp/web.log 2>&1 &) && "
        "(python manage.py runtime --host 127.0.0.1 --port 8001 >/tmp/runtime.log 2>&1 &) && "
        "for i in $(seq 60); do "
        f"  {healthcheck('web')} 2>/dev/null && {healthcheck('runtime')} 2>/dev/null && echo BOTH-HEALTHY && exit 0; "
        "  sleep 1; "
        "done; tail -20 /tmp/web.log /tmp/runtime.log; exit 1"
    )
    assert "BOTH-HEALTHY" in run(image, ["sh", "-c", script])


@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first of these builds the stand-in base and the image
def test_celery_loads_serveml_in_the_image(image):
    assert "software -> celery:" in run(image, ["celery", "-A", "serveml", "report"])


SANDBOX_CHECK = [
    "python",
    "-c",
    "import django; django.setup(); from deployments import sandbox; sandbox.check(); print('sandbox ok')",
]


@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first of these builds the stand-in base and the image
@pytest.mark.parametrize("service", SANDBOXED)
def test_the_sandbox_starts_in_the_image_with_what_compose_gives_it(image, service):
    config = SERVICES[service]
    options = {"user": config["user"], "cap_add": config["cap_add"], "security_opt": config["security_opt"]}
    assert "sandbox ok" in run(image, SANDBOX_CHECK, **options)


@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first of these builds the stand-in base and the image
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cap_add": ["SYS_ADMIN"], "security_opt": ["seccomp=unconfined", "apparmor=unconfined"]},
        {"cap_add": ["SYS_ADMIN", "NET_ADMIN"], "security_opt": ["apparmor=unconfined"]},
    ],
    ids=["docker defaults", "without NET_ADMIN", "with Docker's seccomp profile"],
)
def test_the_sandbox_refuses_to_start_with_less(image, options):
    import docker

    with pytest.raises(docker.errors.ContainerError) as refused:
        run(image, SANDBOX_CHECK, **options)
    assert "SandboxUnavailable" in refused.value.stderr.decode()
