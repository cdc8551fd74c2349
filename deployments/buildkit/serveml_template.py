"""A warm template: forks the model processes of one environment's deployments.

Run by the environment's interpreter inside its own sandbox
(deployments/runtime/templates.py starts it through serveml_userns.py) as
`python -I -B serveml_template.py CONTROL_FD`. It imports the environment's
heavy modules (numpy, scipy, scikit-learn, pandas when present) once, and no
model. Then, for each request on its control socket, it forks a model process
that shares those pages with it and every sibling until it writes to them.

A forked model process is isolated before it reads anything of its deployment:

    fork        M, a short-lived middle process
    unshare     M: new mount, PID, network, IPC and UTS namespaces
    fork        G: PID 1 of its own PID namespace, so it sees no other process, and
                when it ends, everything started inside ends with it
    mount       G: a fresh /proc (only itself), private /tmp and /dev/shm, and a
                /work holding only its own deployment's files, then read-only
    rlimits     G: memory, CPU, processes, file size, open files, no cores, few
                pending signals, no POSIX message queues
    uid         G: deployment N's own uid (host SERVEML_SANDBOX_UID_BASE + N, never
                0), no groups, every capability dropped, no new privileges
    keyring     G: a new, empty session keyring (fork keeps the template's, which
                every sibling would share), charged to deployment N's key quota

and only then forks the model process, which runs model_server.py's loop and
loads the model from /work; G stays as the namespace's init (a PID 1 ignores
signals sent from inside its namespace, so the model process must not be it).
M sends the runtime a pidfd for G (killing G ends the namespace) and exits.

The template itself is uid 0 of a user namespace whose ids are the tenants'
uids, inside a bubblewrap sandbox with no network and only read-only binds; it
holds no model and no deployment's data. One template serves one owner's
deployments of one environment, so code that an environment's package leaves
running in it reaches only deployments that installed that same package.

Control messages are JSON with file descriptors attached (SCM_RIGHTS):
    runtime → template: {"uid", "label", "limits", "files": [names]} with
                        [requests, answers, log, *files] (two pipes, its log, its files)
    template → runtime: {"ready": [modules]} once, then per request
                        {"pid": n} with [pidfd], or {"error": "..."}
Stdlib only: it runs in the model's environment.
"""

import ctypes
import gc
import importlib
import json
import os
import resource
import socket
import sys
import time
import traceback

# What a scikit-learn model's unpickling imports, heaviest first. Each one missing from the
# environment is skipped; together they are most of a model process's memory.
HEAVY = (
    "numpy",
    "scipy",
    "scipy.sparse",
    "scipy.special",
    "scipy.stats",
    "pandas",
    "joblib",
    "threadpoolctl",
    "sklearn",
    "sklearn.base",
    "sklearn.utils",
    "sklearn.pipeline",
    "sklearn.compose",
    "sklearn.preprocessing",
    "sklearn.impute",
    "sklearn.feature_extraction",
    "sklearn.feature_selection",
    "sklearn.decomposition",
    "sklearn.linear_model",
    "sklearn.tree",
    "sklearn.ensemble",
    "sklearn.svm",
    "sklearn.neighbors",
    "sklearn.naive_bayes",
    "sklearn.neural_network",
    "sklearn.cluster",
    "sklearn.calibration",
    "sklearn.model_selection",
    "skops.io",
)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
PENDING_SIGNALS = 64  # queued real-time signals, all of a deployment's processes together
# Received descriptors are first moved up here, out of the way of 0-2 and the files' places.
SCRATCH_FD = 100
FIRST_FILE_FD = 3

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class Refused(Exception):
    """A step of the isolation failed: the model process must not run."""


def call(result: int, what: str) -> None:
    if result != 0:
        raise Refused(f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
    call(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def warm() -> list[str]:
    imported = []
    for name in HEAVY:
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or broken: its deployments import it themselves, and fail there
            continue
        imported.append(name)
    import model_server  # noqa: F401  (imported once here: every fork runs it)
    import protocol  # noqa: F401

    # Objects that exist now are never collected: the collector would otherwise write to
    # every one of them in every fork, and each page it touched would stop being shared.
    gc.collect()
    gc.freeze()
    return imported


def serve(control: socket.socket) -> None:
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 65536, 16)
        except InterruptedError:
            continue
        if not data:
            return  # the runtime closed the socket: stop, and every model process with us
        try:
            request = json.loads(data)
            middle = os.fork()
        except Exception as exc:
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": f"the template could not fork: {exc}"}).encode())
            continue
        if middle == 0:
            os._exit(middle_process(control, request, fds))
        for fd in fds:
            os.close(fd)  # the model process has its own copies
        _, status = os.waitpid(middle, 0)
        if os.waitstatus_to_exitcode(status) != 0:  # it died before it could answer
            control.send(json.dumps({"error": f"the fork failed (status {status})"}).encode())


def middle_process(control: socket.socket, request: dict, fds: list[int]) -> int:
    try:
        call(
            libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
            "unshare namespaces",
        )
        child = os.fork()
        if child == 0:
            model_process(control, request, fds)  # never returns
        pidfd = os.pidfd_open(child)
    except Exception as exc:
        control.send(json.dumps({"error": f"the model process could not be isolated: {exc}"}).encode())
        return 0
    socket.send_fds(control, [json.dumps({"pid": child}).encode()], [pidfd])
    return 0


def model_process(control: socket.socket, request: dict, fds: list[int]) -> None:
    """G: isolate, then serve. Any failure is reported on the answer pipe, and it exits."""
    answers = [fds[1]]  # where the answer pipe is: isolate() moves it to fd 1 (and closes the rest)
    try:
        control.close()
        isolate(request, fds, answers)
    except BaseException as exc:
        message = f"the model process could not be isolated ({exc}); nothing of the model was loaded"
        try:
            import protocol

            os.write(answers[0], protocol.encode_answer(503, message.encode()))
        finally:
            os._exit(1)
    # This process is PID 1 of the new namespace, which no signal from inside it can kill:
    # it stays as the namespace's init (reaps, and ends it), and its child is the model process.
    try:
        server = os.fork()
    except OSError:
        os._exit(1)
    if server == 0:
        import model_server  # imported by the template already: nothing is read from disk here

        try:
            model_server.main(".")
        finally:
            os._exit(0)
    os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the pipes' ends are the server's alone
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == server:  # leaving ends the namespace: whatever the model started dies with it
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def isolate(request: dict, fds: list[int], answers_fd: list[int]) -> None:
    names = request["files"]
    if len(fds) != 3 + len(names):
        raise Refused(f"{len(fds)} descriptors for {len(names)} files")
    moved = [os.dup2(fd, SCRATCH_FD + i, inheritable=True) for i, fd in enumerate(fds)]
    requests, answers, log, files = moved[0], moved[1], moved[2], moved[3:]
    os.dup2(requests, 0)
    os.dup2(answers, 1)
    answers_fd[0] = 1
    os.dup2(log, 2)
    places = [os.dup2(fd, FIRST_FILE_FD + i, inheritable=False) for i, fd in enumerate(files)]
    os.closerange(FIRST_FILE_FD + len(places), resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    limits = request["limits"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here is seen outside
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # its own PID namespace only
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits['tmp_bytes']},mode=1777")
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=1777")
    mount("tmpfs", "/work", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for name, fd in zip(names, places, strict=True):
        if "/" in name or name in ("", ".", ".."):
            raise Refused(f"a file name must be plain, not {name!r}")
        # Read through the descriptor the runtime opened: the deployment's folder itself is
        # not in this mount namespace, and the file is root's and read-only to everyone.
        os.symlink(f"/proc/self/fd/{fd}", f"/work/{name}")
    mount(None, "/work", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/work")

    for limit, value in (
        (resource.RLIMIT_AS, limits["memory_bytes"]),
        (resource.RLIMIT_NPROC, limits["processes"]),
        (resource.RLIMIT_FSIZE, limits["file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
        # Counted against the host root's quotas too (root made the template's user namespace):
        # a model needs neither, and could otherwise hold all of root's (see serveml_userns.py).
        (resource.RLIMIT_SIGPENDING, PENDING_SIGNALS),
        (resource.RLIMIT_MSGQUEUE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    if limits.get("cpu_seconds"):
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))

    uid = int(request["uid"])
    if uid <= 0:
        raise Refused("a model process never runs as uid 0")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    for capability in range(64):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    try:
        serveml_keyring.new_session_keyring()  # as the deployment's uid: its key quota pays for it
    except OSError as exc:
        raise Refused(str(exc)) from None
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
    if os.getresuid() != (uid, uid, uid) or _effective_capabilities() != 0:
        raise Refused("the process kept privileges it must not have")
    sys.argv = ["model_server.py", ".", request.get("label", "")]


def _effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise Refused("no CapEff line in /proc/self/status")


def main(control_fd: int) -> None:
    # Its stdin and stdout are /dev/null; the control socket is the only way in.
    control = socket.socket(fileno=control_fd)
    os.set_inheritable(control_fd, False)
    started = time.monotonic()
    try:
        imported = warm()
    except BaseException:
        traceback.print_exc()
        control.send(json.dumps({"error": "the template could not import its modules"}).encode())
        return
    control.send(json.dumps({"ready": imported, "seconds": round(time.monotonic() - started, 3)}).encode())
    serve(control)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves it out
    import serveml_keyring

    main(int(sys.argv[1]))
