"""The one way to start anything from a user's environment: a bubblewrap sandbox.

Every process that runs a user's code or packages (the validate probe, every
runtime model process, the bytecode compilation of a new environment) starts
through `launch`. The command it builds, from the outside in:

    bwrap      new PID, network, IPC, UTS, cgroup and mount namespaces; a root made
               only of read-only binds (/usr, the environment at /env, the files
               at /work) plus a private /tmp and its own /proc and /dev; it dies
               with its parent, and every process inside dies with it
    prlimit    address space, CPU time, processes, file size, open files, no cores
    setpriv    the deployment's own unprivileged uid on the host (never 0), no
               groups, no capabilities, no new privileges
    keyring    a new, empty session keyring (the host's Python -I -S runs
               buildkit/serveml_keyring.py): not the runtime's, shared by all
    unshare    a user namespace of its own, created by that uid
    python -I  the environment's interpreter, with a scrubbed environment

bwrap runs as root so that it can bind what lies under a 0700 folder (a
checkout in `mktemp -d`) without making anything on the host readable by
others; the process itself then runs as a uid nobody else has.

If any of this cannot be built, `launch` raises SandboxUnavailable with what is
missing and how to fix it: nothing falls back silently. An operator can switch
the sandbox off on a development machine (SERVEML_SANDBOX=off); every page and
the admin then say so, and processes run only with limits and a scrubbed
environment.
"""

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from deployments import buildkit

# Passed through because some CPUs need them for OpenBLAS to compute correctly.
PASSTHROUGH_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LANG", "TZ")
TOOLS = ("bwrap", "prlimit", "setpriv", "unshare")
INSIDE_ENV = Path("/env")
INSIDE_WORK = Path("/work")
KEYRING_FILE = "serveml_keyring.py"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built on this host; the message says what to fix."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_seconds: int | None
    processes: int = 64
    file_bytes: int = 64 * 1024**2
    open_files: int = 256
    tmp_bytes: int = 64 * 1024**2


@dataclass
class Launch:
    """A command ready for Popen or asyncio's subprocess_exec, and the files it holds open."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    cleanup: list[Path] = field(default_factory=list)
    isolated: bool = True

    def popen_kwargs(self) -> dict:
        # start_new_session instead of a preexec_fn: it is applied by the C child code,
        # safe with threads, and makes the whole box one process group for kill_group.
        return {
            "env": self.env,
            "cwd": self.cwd,
            "pass_fds": self.pass_fds,
            "close_fds": True,
            "start_new_session": True,
        }

    def started(self) -> None:
        """The child has its copies of the descriptors: close ours."""
        for fd in self.pass_fds:
            os.close(fd)
        self.pass_fds = ()

    def close(self) -> None:
        self.started()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup = []


def is_disabled() -> bool:
    return settings.SERVEML_SANDBOX == "off"


def uid_for(deployment_pk: int) -> int:
    """Each deployment's processes run as a uid of their own: no tenant can signal,
    trace or read another's processes even if it escaped its namespaces."""
    return settings.SERVEML_SANDBOX_UID_BASE + deployment_pk


def builder_uid() -> int:
    """The uid that compiles a new environment's bytecode (no deployment has it)."""
    return settings.SERVEML_SANDBOX_UID_BASE


def check() -> None:
    """Raise SandboxUnavailable unless this host can build the sandbox (or it is switched off)."""
    if is_disabled():
        return
    problem = _probe()
    if problem:
        raise SandboxUnavailable(problem)


# Remembered only on success: a host that gets fixed is picked up without a restart.
_verified = False


def _probe() -> str:
    global _verified
    if _verified:
        return ""
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return (
            f"ServeML's sandbox cannot start: {', '.join(missing)} not found. Install bubblewrap and util-linux "
            "(Debian: apt-get install bubblewrap util-linux) on the host that runs the worker and the runtime. "
            "Models are never loaded without the sandbox."
        )
    if os.geteuid() != 0:
        return (
            "ServeML's sandbox cannot start: the worker and the runtime must run as root so that each deployment "
            "runs as an unprivileged user of its own (run them in a container or VM as root). "
            "Models are never loaded without the sandbox; on a development machine an operator may set "
            "SERVEML_SANDBOX=off."
        )
    trial = _argv(
        uid=builder_uid(),
        environment=None,
        work=None,
        binds={},
        data={},
        writable_environment=False,
        limits=Limits(memory_bytes=256 * 1024**2, cpu_seconds=5),
        command=["/usr/bin/true"],
    )
    try:
        done = subprocess.run(trial, capture_output=True, text=True, timeout=20, env=_scrubbed_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ServeML's sandbox cannot start: bubblewrap did not run ({exc})."
    if done.returncode != 0:
        return (
            "ServeML's sandbox cannot start on this host: bubblewrap failed with "
            f"{done.stderr.strip()[-300:]!r}. It needs namespaces (a container must allow them: CAP_SYS_ADMIN, "
            "or --privileged, and no seccomp profile that blocks unshare). Models are never loaded without it."
        )
    _verified = True
    return ""


def _scrubbed_env(extra: dict[str, str] | None = None, home: str = "/tmp") -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
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


def _venv_home(environment: Path) -> Path | None:
    """The folder of the interpreter a venv was made from (pyvenv.cfg's `home`), if it says."""
    config = environment / "pyvenv.cfg"
    for line in config.read_text().splitlines() if config.exists() else ():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip())
    return None


def _interpreter_home(environment: Path) -> Path | None:
    """The prefix of the interpreter a venv was made from, when it is not under /usr (pyenv, say)."""
    home = _venv_home(environment)
    if home is None:
        return None
    prefix = home.resolve().parent
    return None if prefix == Path("/usr") or Path("/usr") in prefix.parents else prefix


def _prlimit(limits: Limits) -> list[str]:
    argv = [
        "prlimit",
        f"--as={limits.memory_bytes}",
        f"--nproc={limits.processes}",
        f"--fsize={limits.file_bytes}",
        f"--nofile={limits.open_files}",
        "--core=0",
    ]
    if limits.cpu_seconds:
        argv.append(f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}")
    return argv + ["--"]


def _argv(
    *, uid, environment, work, binds, data, writable_environment, limits, command, template=False, host_python=None
) -> list[str]:
    argv = [
        "bwrap",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        # A template's launcher mounts a plain /proc itself: bubblewrap's has read-only covers,
        # and the kernel lets a namespaced process mount a fresh /proc only where one is fully visible.
        *(("--dir", "/proc") if template else ("--proc", "/proc")),
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(limits.tmp_bytes),
        "--tmpfs",
        "/tmp",
    ]
    if environment is not None:
        home = _interpreter_home(environment)
        if home is not None:
            argv += ["--ro-bind", str(home), str(home)]
        argv += ["--bind" if writable_environment else "--ro-bind", str(environment), str(INSIDE_ENV)]
    argv += ["--perms", "0755", "--dir", str(INSIDE_WORK)]
    for name, source in binds.items():
        argv += ["--ro-bind", str(source), str(INSIDE_WORK / name)]
    for name, fd in data.items():
        argv += ["--perms", "0444", "--ro-bind-data", str(fd), str(INSIDE_WORK / name)]
    argv += ["--chdir", str(INSIDE_WORK), "--"]
    argv += _prlimit(limits)
    if template:
        return argv + command  # serveml_userns.py drops root itself (see launch_template)
    argv += [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    if host_python is not None:  # a session keyring of its own, not the runtime's (buildkit/serveml_keyring.py)
        argv += [str(host_python), "-I", "-S", str(INSIDE_WORK / KEYRING_FILE)]
    argv += ["unshare", "--user", "--"]
    return argv + command


def check_name(name: str) -> None:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"sandbox file names are plain names, not {name!r}")


def launch(
    *,
    uid: int,
    environment: Path,
    args: list[str],
    limits: Limits,
    files: dict[str, Path | bytes] | None = None,
    binds: dict[str, Path] | None = None,
    writable_environment: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Launch:
    """Run `<environment>/bin/python -I -B *args` in a fresh sandbox, in /work holding `files`
    (copied in through a descriptor, so they may be private to ServeML; bytes are given
    through an anonymous memory file, so nothing is left on disk) and `binds` (bound
    read-only, no copy: they must be world-readable, as build contexts are).

    Raises SandboxUnavailable when the sandbox cannot be built."""
    files, binds = files or {}, binds or {}
    for name in [*files, *binds]:
        check_name(name)
        if name == KEYRING_FILE:
            raise ValueError(f"{name} is the sandbox's own file")
    for path in binds.values():
        if not os.stat(path).st_mode & 0o004:
            raise ValueError(f"{path} is bound into a sandbox without a copy, so it must be world-readable")
    if is_disabled():
        return _launch_unsandboxed(environment, args, limits, {**files, **binds}, extra_env)
    check()
    host_python = _host_python(environment)
    fds = {name: _descriptor(name, source) for name, source in files.items()}
    fds[KEYRING_FILE] = _descriptor(KEYRING_FILE, buildkit.KEYRING)
    command = [str(INSIDE_ENV / "bin" / "python"), "-I", "-B", *args]
    argv = _argv(
        uid=uid,
        environment=environment,
        work=INSIDE_WORK,
        binds=binds,
        data=fds,
        writable_environment=writable_environment,
        limits=limits,
        command=command,
        host_python=host_python,
    )
    return Launch(argv=argv, env=_scrubbed_env(extra_env), cwd="/", pass_fds=tuple(fds.values()))


def launch_template(*, environment: Path, limits: Limits, files: dict[str, Path], control_fd: int) -> Launch:
    """A warm template for `environment` (deployments/runtime/templates.py), in a sandbox like
    launch's but with a user namespace whose uid 0 is SERVEML_SANDBOX_UID_BASE on the host and
    whose uid N is deployment N's: the template can give each process it forks its deployment's
    uid and no other. The host's own Python (-I -S: none of the environment's code) sets that
    namespace up as root inside bubblewrap (buildkit/serveml_userns.py); the environment's
    interpreter only ever runs inside it. `control_fd` stays open in the template."""
    if is_disabled():
        raise SandboxUnavailable("templates need the sandbox: with SERVEML_SANDBOX=off model processes start alone")
    for name in files:
        check_name(name)
    check()
    fds = {name: _descriptor(name, source) for name, source in files.items()}
    fds["serveml_userns.py"] = _descriptor("serveml_userns.py", buildkit.USERNS)
    base = settings.SERVEML_SANDBOX_UID_BASE
    command = [
        str(_host_python(environment)),
        "-I",
        "-S",
        str(INSIDE_WORK / "serveml_userns.py"),
        str(base),
        str(settings.SERVEML_SANDBOX_UID_COUNT),
        "--",
        str(INSIDE_ENV / "bin" / "python"),
        "-I",
        "-B",
        str(INSIDE_WORK / "serveml_template.py"),
        str(control_fd),
    ]
    argv = _argv(
        uid=base,
        environment=environment,
        work=INSIDE_WORK,
        binds={},
        data=fds,
        writable_environment=False,
        limits=limits,
        command=command,
        template=True,
    )
    return Launch(argv=argv, env=_scrubbed_env(), cwd="/", pass_fds=(*fds.values(), control_fd))


def _host_python(environment: Path) -> Path:
    """The interpreter the environment was made from (the host's, not the environment's
    copy): with -I -S it runs nothing that the environment installed."""
    home = _venv_home(environment)
    for name in ("python3", "python") if home is not None else ():
        if (home / name).exists():
            return home / name
    raise SandboxUnavailable(f"{environment} has no pyvenv.cfg naming its interpreter: rebuild the environment")


def _descriptor(name: str, source: Path | bytes) -> int:
    if not isinstance(source, bytes):
        return os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, source)  # memfd writes are not short
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _launch_unsandboxed(environment, args, limits, files, extra_env) -> Launch:
    """SERVEML_SANDBOX=off: limits and a scrubbed environment only, in a private folder."""
    workdir = Path(tempfile.mkdtemp(prefix="serveml-unsandboxed-"))
    for name, source in files.items():
        if isinstance(source, bytes):
            (workdir / name).write_bytes(source)
        else:
            shutil.copyfile(source, workdir / name)
    argv = [*_prlimit(limits), str(environment / "bin" / "python"), "-I", "-B", *args]
    return Launch(
        argv=argv, env=_scrubbed_env(extra_env, home=str(workdir)), cwd=str(workdir), cleanup=[workdir], isolated=False
    )


def describe(limits: Limits) -> str:
    """For the event log: what the process ran under."""
    if is_disabled():
        return "SANDBOX OFF (SERVEML_SANDBOX=off): limits and a scrubbed environment only"
    cpu = f", CPU {limits.cpu_seconds} s" if limits.cpu_seconds else ""
    return (
        "bubblewrap: own uid, user, PID, network, IPC and mount namespaces, read-only binds only; "
        f"memory {limits.memory_bytes // 1024**2} MiB{cpu}, {limits.processes} processes"
    )


@dataclass
class SandboxResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


def run(launched: Launch, *, wall_seconds: float, stdin: bytes | None = None) -> SandboxResult:
    """Run a prepared sandbox to completion under a wall-clock limit."""
    try:
        try:
            proc = subprocess.Popen(
                launched.argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                **launched.popen_kwargs(),
            )
        except OSError as exc:  # a tool vanished since the host was checked
            raise SandboxUnavailable(
                f"ServeML's sandbox could not start: {exc}. Models are never loaded "
                "without it; an operator must reinstall bubblewrap and util-linux."
            ) from None
        launched.started()
        try:
            out, err = proc.communicate(stdin, timeout=wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
            timed_out = True
        return SandboxResult(proc.returncode, out, err, timed_out)
    finally:
        launched.close()


def kill_group(pid: int) -> None:
    """Kill a sandbox and all it started: bwrap leads its own process group, and when it
    dies the kernel kills everything in its PID namespace, setsid grandchildren included.
    Only call it before the process is reaped: after that its pid may belong to another."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
