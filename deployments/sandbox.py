"""Run untrusted model code in a separate, restricted process.

Every process that unpickles a user's model (the validate probe and the
runtime's model processes) is started with `isolation_for`, `private_workdir`
and `sandbox_popen_kwargs` (`run_sandboxed` puts them together):

- no network: a fresh network namespace (`unshare --net`) when the host allows it;
- an unprivileged user (`setpriv` to nobody) when we are root and that user
  can read the environment's interpreter; the model and the script that loads
  it are copied, read-only, into the private folder;
- address-space (memory) and CPU-time limits (setrlimit), and a wall-clock
  limit enforced by the caller;
- a scrubbed environment: no AWS keys, Django secret or database URL, only
  what Python needs, and a private temporary working directory.

`Isolation.describe()` says which of these applied, for the event log.
"""

import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

SANDBOX_USER = "nobody"
# Passed through because some CPUs need them for OpenBLAS to compute correctly.
PASSTHROUGH_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LANG", "TZ")


@dataclass
class Isolation:
    prefix: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None

    def describe(self) -> str:
        text = "isolation: " + ", ".join(self.applied)
        if self.missing:
            text += "; not applied: " + ", ".join(self.missing)
        return text


def _readable_by_others(path: Path) -> bool:
    """True when an unprivileged user can reach and read `path`, through its links too."""
    for candidate in {path.absolute(), path.resolve()}:
        for parent in candidate.parents:
            if not os.stat(parent).st_mode & 0o001:
                return False
        if not os.stat(candidate).st_mode & 0o004:
            return False
    return True


@lru_cache(maxsize=1)
def network_namespaces_work() -> bool:
    """Root is not enough: a container without CAP_SYS_ADMIN cannot make namespaces."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "--", "true"], capture_output=True).returncode == 0


def isolation_for(*, python: Path, memory_bytes: int, cpu_seconds: int | None) -> Isolation:
    """What this host allows. The files a sandbox reads are copied into its private
    folder (see private_workdir), so only the interpreter must be readable by nobody."""
    iso = Isolation()
    is_root = os.geteuid() == 0
    if network_namespaces_work():
        iso.prefix += ["unshare", "--net", "--"]
        iso.applied.append("no network (unshare --net)")
    else:
        iso.missing.append("network namespace (needs root with CAP_SYS_ADMIN and unshare)")
    if is_root and shutil.which("setpriv"):
        try:
            user = pwd.getpwnam(SANDBOX_USER)
        except KeyError:
            user = None
        environment = python.parent.parent  # the venv: its site-packages must be readable too
        unreadable = [str(p) for p in (python, environment / "pyvenv.cfg") if p.exists() and not _readable_by_others(p)]
        if user and not unreadable:
            iso.uid, iso.gid = user.pw_uid, user.pw_gid
            iso.prefix += [
                "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                "--inh-caps=-all", "--",
            ]
            iso.applied.append(f"unprivileged user ({SANDBOX_USER})")
        else:
            reason = f"{', '.join(unreadable)} not readable by {SANDBOX_USER}" if user else f"no user {SANDBOX_USER}"
            iso.missing.append(f"unprivileged user ({reason})")
    else:
        iso.missing.append("unprivileged user (needs root and setpriv)")
    iso.applied.append(f"memory limit {memory_bytes // 1024**2} MiB")
    if cpu_seconds:
        iso.applied.append(f"CPU limit {cpu_seconds} s")
    iso.applied.append("scrubbed environment, private temporary directory")
    return iso


def scrubbed_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        # One thread per process: the runtime scales with processes, not threads.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ})
    env.update(extra or {})
    return env


def private_workdir(iso: Isolation, files: dict[str, Path]) -> Path:
    """A fresh folder only the sandbox user may use, holding read-only copies of `files`."""
    workdir = Path(tempfile.mkdtemp(prefix="serveml-sandbox-"))
    for name, source in files.items():
        target = workdir / name
        shutil.copyfile(source, target)
        target.chmod(0o444)
    if iso.uid is not None:
        os.chown(workdir, iso.uid, iso.gid)
    return workdir


def _limits(memory_bytes: int, cpu_seconds: int | None):
    def apply():
        os.setsid()  # own process group, so a timeout kills everything it started
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        if cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def sandbox_popen_kwargs(iso: Isolation, workdir: Path, memory_bytes: int, cpu_seconds: int | None, env=None):
    return {
        "cwd": workdir,
        "env": scrubbed_env(workdir, env),
        "preexec_fn": _limits(memory_bytes, cpu_seconds),
        "close_fds": True,
    }


@dataclass
class SandboxResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    isolation: Isolation


def run_sandboxed(
    python: Path, args: list[str], *, files: dict[str, Path], memory_bytes: int, cpu_seconds: int, wall_seconds: int
) -> SandboxResult:
    """Run `python -I -B *args` in the sandbox, in a private folder holding copies of `files`."""
    iso = isolation_for(python=python, memory_bytes=memory_bytes, cpu_seconds=cpu_seconds)
    workdir = private_workdir(iso, files)
    try:
        proc = subprocess.Popen(
            iso.prefix + [str(python), "-I", "-B", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **sandbox_popen_kwargs(iso, workdir, memory_bytes, cpu_seconds),
        )
        try:
            out, err = proc.communicate(timeout=wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
            timed_out = True
        return SandboxResult(proc.returncode, out, err, timed_out, iso)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def kill_group(pid: int) -> None:
    """Kill a sandboxed process and all it started (it leads its own group: see _limits).
    Only call it before the process is reaped: after that its pid may belong to another."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
