"""Model environments: one virtual environment per distinct requirements.

An environment is keyed by the normalised requirements, the Python version
and the platform, built once with uv from binary wheels only (so no sdist's
setup.py ever runs on this host), and then reused by every deployment with the
same key. ServeML's own packages never enter it: the model's requirements.txt
alone decides its scikit-learn.

Its packages are someone else's code: a wheel may hold a `.pth` file that runs
whenever the environment's interpreter starts. So that interpreter never starts
on the host: uv only unpacks wheels, and the bytecode is compiled inside the
sandbox (deployments/sandbox.py), as an unprivileged uid, before the folder is
sealed (owned by ServeML, read-only to everyone else) and renamed into place.
"""

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from django.conf import settings

from deployments import sandbox
from deployments.requirements import Requirements

COMPLETE_MARKER = ".serveml-complete"


class EnvironmentBuildError(RuntimeError):
    """The environment could not be built; the message is for the user."""


@dataclass
class Environment:
    key: str
    path: Path
    reused: bool
    seconds: float = 0.0
    log: str = ""

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


@lru_cache(maxsize=4)
def _python_tag(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def python_tag() -> str:
    return _python_tag(settings.SERVEML_ENV_PYTHON)


def environment_key(requirements: Requirements) -> str:
    interpreter = os.path.realpath(settings.SERVEML_ENV_PYTHON)
    ident = "\n".join([requirements.normalised(), python_tag(), interpreter, sys.platform, platform.machine()])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def envs_dir() -> Path:
    path = settings.DATA_DIR / "envs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def environment_path(key: str) -> Path:
    return envs_dir() / key


def uv_binary() -> str:
    candidate = Path(sys.executable).parent / "uv"
    return str(candidate) if candidate.exists() else (shutil.which("uv") or "uv")


def ensure_environment(requirements: Requirements) -> Environment:
    """Return the environment for these requirements, building it if it does not exist yet."""
    key = environment_key(requirements)
    path = envs_dir() / key
    if (path / COMPLETE_MARKER).exists():
        return Environment(key=key, path=path, reused=True)
    # Two workers may want the same new environment: one builds, the other waits and reuses.
    with open(envs_dir() / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / COMPLETE_MARKER).exists():
            return Environment(key=key, path=path, reused=True)
        started = time.monotonic()
        _remove_leftovers(key)  # builds of this key that a killed worker left behind
        staging = envs_dir() / f".{key}.{uuid.uuid4().hex[:8]}"
        try:
            log = _build(staging, requirements)
            log += _compile_in_sandbox(staging)
            (staging / COMPLETE_MARKER).write_text(requirements.normalised())
            _seal(staging)
            shutil.rmtree(path, ignore_errors=True)
            os.rename(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Environment(key=key, path=path, reused=False, seconds=time.monotonic() - started, log=log)


def _remove_leftovers(key: str) -> None:
    for leftover in envs_dir().glob(f".{key}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def uv_env() -> dict[str, str]:
    """What uv needs from our environment: certificates, proxies, the operator's one index. No secrets."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")),
        "UV_NO_CONFIG": "1",
    }
    if settings.SERVEML_PACKAGE_INDEX_URL:
        env["UV_DEFAULT_INDEX"] = settings.SERVEML_PACKAGE_INDEX_URL
    for name in (
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "no_proxy",
    ):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _build(staging: Path, requirements: Requirements) -> str:
    uv = uv_binary()
    env = uv_env()
    commands = [
        [uv, "venv", "--quiet", "--relocatable", "--python", settings.SERVEML_ENV_PYTHON, str(staging)],
        [
            uv,
            "pip",
            "install",
            "--python",
            str(staging / "bin" / "python"),
            "--only-binary",
            ":all:",
            "--no-progress",
            "-r",
            str(staging / "requirements.txt"),
            # No --compile-bytecode: uv would start the new environment's own interpreter
            # here, on the host, and run any .pth file a package ships.
        ],
    ]
    logs = []
    for number, command in enumerate(commands):
        if number == 1:
            (staging / "requirements.txt").write_text(requirements.normalised())
        try:
            done = subprocess.run(
                dies_with_parent(command),
                env=env,
                capture_output=True,
                text=True,
                timeout=settings.SERVEML_ENV_INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(
                f"Installing the requirements took longer than {settings.SERVEML_ENV_INSTALL_TIMEOUT_S} s. "
                "Try again later; if it keeps happening, ask an operator to check the package index."
            ) from None
        logs.append((done.stdout + done.stderr).strip())
        if done.returncode != 0:
            raise EnvironmentBuildError(_explain_install_failure(done.stderr))
    return "\n".join(line for line in logs if line)


def dies_with_parent(command: list[str]) -> list[str]:
    """`command`, killed by the kernel if the process that started it dies (a worker SIGKILLed
    mid-install): otherwise uv would go on writing into a staging folder the cleanup removes."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise EnvironmentBuildError(
            "setpriv (util-linux) is not installed, and ServeML needs it to run installs. "
            "Install util-linux (Debian: apt-get install util-linux) and deploy again."
        )
    return [setpriv, "--pdeathsig", "KILL", "--", *command]


def _compile_in_sandbox(staging: Path) -> str:
    """Compile the environment's bytecode with its own interpreter, inside the sandbox.

    Model processes cannot write bytecode, and with it compiled once a model process
    starts in 0.7 s instead of 1.7 s. Whatever a package runs at start-up runs here,
    contained, and can only change this environment, which is its own."""
    try:
        sandbox.check()
    except sandbox.SandboxUnavailable as exc:
        raise EnvironmentBuildError(str(exc)) from None
    if not sandbox.is_disabled():
        _chown_tree(staging, sandbox.builder_uid())
    limits = sandbox.Limits(memory_bytes=2 * 1024**3, cpu_seconds=600, file_bytes=512 * 1024**2)
    inside = sandbox.INSIDE_ENV if not sandbox.is_disabled() else staging
    launched = sandbox.launch(
        uid=sandbox.builder_uid(),
        environment=staging,
        writable_environment=True,
        limits=limits,
        args=["-m", "compileall", "-q", "-q", str(inside / "lib")],
    )
    result = sandbox.run(launched, wall_seconds=settings.SERVEML_ENV_INSTALL_TIMEOUT_S)
    if result.timed_out:
        raise EnvironmentBuildError(
            f"Compiling the installed packages took longer than {settings.SERVEML_ENV_INSTALL_TIMEOUT_S} s."
        )
    # compileall exits 1 when a file does not compile (a package's Python 2 test file, say):
    # that file simply stays uncompiled. Anything else is the sandbox or the interpreter failing.
    if result.returncode not in (0, 1):
        detail = result.stderr.decode(errors="replace").strip()[-500:]
        raise EnvironmentBuildError(f"Compiling the installed packages failed in the sandbox: {detail}")
    return f"\nbytecode compiled in the sandbox ({sandbox.describe(limits)})"


def _chown_tree(root: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, entry) for entry in dirs + files)]:
            os.lchown(name, uid, uid)


def _seal(root: Path) -> None:
    """ServeML owns the environment; sandboxes (other uids) may read and run it, never change it."""
    _chown_tree(root, os.geteuid())
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                mode = os.lstat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)


def _explain_install_failure(stderr: str) -> str:
    detail = "\n".join(stderr.strip().splitlines()[-12:])
    hint = ""
    if "no wheels" in stderr.lower() or "only-binary" in stderr.lower() or "has no wheel" in stderr.lower():
        hint = (
            " One of the pinned versions has no binary wheel for this platform, and ServeML never builds "
            "packages from source. Pin a version that publishes wheels for Python "
            f"{python_tag()} on Linux."
        )
    elif "not found" in stderr.lower() or "no solution" in stderr.lower() or "unsatisfiable" in stderr.lower():
        hint = " Check the package names and versions in requirements.txt: the index has no match for them."
    return f"Installing requirements.txt failed.{hint}\n{detail}"
