"""Warm templates attacked: a hostile model in a forked model process (and a hostile package in the
template itself) tries every way out that an attacker who read serveml_template.py would try.

Each test runs the attack in a real template's real fork (or a real template), then looks from
inside and from the host at what it reached. The attacker's handler runs whatever Python its
request carries, as the deployment's uid, after the fork's isolation: as an unpickled object would.
"""

import asyncio
import ctypes
import json
import os
import subprocess
import time
from pathlib import Path

from django.conf import settings

from deployments import sandbox
from deployments.runtime import memory, templates
from deployments.runtime.process import ModelUnavailable
from tests.test_sandbox import environment, host_processes  # noqa: F401  (fixture)
from tests.test_templates import SPY, pool, run, server_of

# Runs the Python its request carries, with `result` to fill in, and answers `result`.
ATTACKER = r"""
import ctypes, errno, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def attempt(action):
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "DONE"

def check(value):
    return "DONE" if value >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

def model():
    pass

def handle_many(bodies):
    answers = []
    for body in bodies:
        scope = {"result": {}, "attempt": attempt, "check": check, "libc": libc, "ctypes": ctypes}
        try:
            exec(json.loads(body)["code"], scope)
        except BaseException as exc:
            scope["result"]["raised"] = f"{type(exc).__name__}: {exc}"
        answers.append((200, json.dumps(scope["result"]).encode()))
    return answers
"""

MODEL_FILES = {"model.pkl", "serveml.json", "serveml_handler.py", "serveml_loader.py"}
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID = 0x10000000, 0x00020000, 0x20000000
SYS_ADD_KEY, SYS_KEYCTL = 248, 250  # x86_64
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SEARCH, KEYCTL_READ = 1, 10, 11
KEY_SPEC_SESSION_KEYRING = -3
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def attacker(environment, tmp_path, number: int, owner: int = 1):
    return pool(environment, tmp_path, number, owner=owner, handler=ATTACKER)


async def ask(each, code: str) -> dict:
    status, body = await each.predict(json.dumps({"code": code}).encode())
    assert status == 200, body
    result = json.loads(body)
    assert "raised" not in result, result["raised"]
    return result


def template_interpreter(template) -> int:
    """The template's own interpreter (uid 0 of its namespace: the host's SERVEML_SANDBOX_UID_BASE)."""
    seen = host_processes()
    (pid,) = [
        pid
        for pid in memory.tree(template.pid, memory.children_of())
        if seen.get(pid, {}).get("uid") == sandbox.builder_uid() and seen[pid]["cmdline"].startswith("/env/bin/python")
    ]
    return pid


def descriptors(pid: int) -> dict[int, str]:
    """What each of a process's descriptors is, read from the host's /proc."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


# ------------------------------------------------------------------ descriptors


LIST_FDS = r"""
import os, stat
for name in os.listdir("/proc/self/fd"):
    try:
        info = os.fstat(int(name))
    except OSError:
        continue  # the listing's own, closed already
    result[name] = {"link": os.readlink(f"/proc/self/fd/{name}"), "mode": stat.filemode(info.st_mode)}
"""


def test_a_fork_holds_only_its_own_descriptors_and_the_template_keeps_none_of_a_deployments(environment, tmp_path):
    template_log = ""

    async def scenario():
        first, second = attacker(environment, tmp_path, 1), attacker(environment, tmp_path, 2)
        try:
            inside_first = await ask(first, LIST_FDS)
            inside_second = await ask(second, LIST_FDS)  # forked after the first: nothing of it may leak in
            template = first.processes[0].template
            nonlocal template_log
            template_log = template.log_name
            host = {
                "template": descriptors(template_interpreter(template)),
                "init": descriptors(first.processes[0].pid),
                "server": descriptors(server_of(first.processes[0])),
            }
            return inside_first, inside_second, host
        finally:
            first.close()
            second.close()

    inside_first, inside_second, host = run(scenario)
    for number, inside in ((1, inside_first), (2, inside_second)):
        # model_server.py moved the answer pipe off fd 1 (a dup) and pointed fd 1 at the log.
        links = {int(fd): each["link"] for fd, each in inside.items()}
        requests, log = links[0], links[2]
        pipes = {link for link in links.values() if link.startswith("pipe:")}
        assert requests in pipes and len(pipes) == 2  # its requests' pipe and its answers'
        assert log.endswith(f"/logs/model-0f0e0d0c-0000-4000-8000-0000000007{number:02d}.log")
        files = {fd: link for fd, link in links.items() if link not in (*pipes, log)}
        assert sorted(files) == [3, 4, 5, 6], links
        assert {Path(link).name for link in files.values()} == MODEL_FILES
        assert all(Path(link).parent == tmp_path / f"deployment-{number}" for link in files.values()), files
        assert all(inside[str(fd)]["mode"] == "-r--r--r--" for fd in files)  # no folder, nothing writable
    # The namespace's init closed everything; the template holds its stdio and its control socket only.
    assert host["init"] == {}
    template = host["template"]
    assert template[0] == template[1] == "/dev/null" and template[2].endswith(f"/logs/{template_log}"), template
    (control,) = set(template) - {0, 1, 2}
    assert template[control].startswith("socket:")
    assert set(host["server"]) == {int(fd) for fd in inside_first}


# ------------------------------------------------------------------ /work's links to /proc/self/fd

ESCAPE_WORK = r"""
import os
for name in sorted(os.listdir("/work")):
    link = os.readlink("/work/" + name)
    fd = int(link.rsplit("/", 1)[1])
    host = os.readlink(link)
    result[name] = {
        "link": link,
        "reopen write-only": attempt(lambda: os.close(os.open(link, os.O_WRONLY))),
        "reopen read-write": attempt(lambda: os.close(os.open(link, os.O_RDWR))),
        "reopen append": attempt(lambda: os.close(os.open(link, os.O_WRONLY | os.O_APPEND))),
        "truncate": attempt(lambda: os.truncate(link, 0)),
        "ftruncate": attempt(lambda: os.ftruncate(fd, 0)),
        "fchmod": attempt(lambda: os.fchmod(fd, 0o666)),
        "chmod through the link": attempt(lambda: os.chmod(link, 0o666)),
        "fchown": attempt(lambda: os.fchown(fd, os.getuid(), os.getgid())),
        "utime": attempt(lambda: os.utime(fd, (0, 0))),
        "xattr": attempt(lambda: os.setxattr(fd, "user.planted", b"1")),
        "the host path": attempt(lambda: open(host, "rb").close()),
        "its folder through the link": attempt(lambda: os.listdir(link + "/..")),
        "its folder from the descriptor": attempt(lambda: os.close(os.open("..", os.O_RDONLY, dir_fd=fd))),
        "hard link into /tmp": attempt(lambda: os.link(link, "/tmp/linked-" + name)),
        "replace the link": attempt(lambda: os.symlink("/tmp", "/work/" + name + ".new")),
    }
result["log read back"] = attempt(lambda: os.close(os.open("/proc/self/fd/2", os.O_RDONLY)))
"""


def test_the_links_in_work_reopen_nothing_writable_and_lead_nowhere_on_the_host(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 3)
        try:
            return await ask(each, ESCAPE_WORK)
        finally:
            each.close()

    report = run(scenario)
    assert set(report) == MODEL_FILES | {"log read back"}
    for name in MODEL_FILES:
        attempts = {key: value for key, value in report[name].items() if key != "link"}
        assert "DONE" not in attempts.values(), (name, attempts)
    assert report["log read back"] == "PermissionError"  # root's 0600 log: written through fd 2 only
    for name in MODEL_FILES:
        assert (tmp_path / "deployment-3" / name).stat().st_mode & 0o777 == 0o444


# ------------------------------------------------------------------ signals, ptrace, the namespace's init

REACH_INIT = r"""
import os, signal
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
result["pid"] = os.getpid()
result["ppid"] = os.getppid()
result["pgrp"] = os.getpgrp()
result["sid"] = os.getsid(0)
result["processes"] = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
result["ptrace init"] = check(libc.ptrace(PTRACE_ATTACH, 1, None, None))
result["seize init"] = check(libc.ptrace(PTRACE_SEIZE, 1, None, None))
result["init's memory"] = attempt(lambda: open("/proc/1/mem", "rb").close())
result["init's environ"] = attempt(lambda: open("/proc/1/environ", "rb").read())
result["init's descriptors"] = attempt(lambda: os.listdir("/proc/1/fd"))
result["init's root"] = attempt(lambda: os.listdir("/proc/1/root/"))
def grab():
    pidfd = os.pidfd_open(1)
    try:
        if libc.syscall(438, pidfd, 0, 0) < 0:  # pidfd_getfd
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(pidfd)
result["init's descriptor 0 by pidfd_getfd"] = attempt(grab)
result["kill -1"] = attempt(lambda: os.kill(-1, signal.SIGCONT))
result["setuid 0"] = attempt(lambda: os.setuid(0))
result["setgroups"] = attempt(lambda: os.setgroups([0]))
result["write the uid map"] = attempt(lambda: open("/proc/self/uid_map", "w").write("0 0 1"))
result["write init's uid map"] = attempt(lambda: open("/proc/1/uid_map", "w").write("0 0 1"))
result["setns into init's mount namespace"] = attempt(lambda: check(libc.setns(os.open("/proc/1/ns/mnt", 0), 0)))
result["setns into its own user namespace"] = check(libc.setns(os.open("/proc/self/ns/user", 0), 0))
"""

KILL_EVERYTHING = r"""
import os, signal
os.kill(0, signal.SIGKILL)  # its process group is the template's: the template and every sibling are in it
"""


def test_a_fork_cannot_trace_its_init_nor_signal_its_template_or_a_sibling(environment, tmp_path):
    async def scenario():
        victim, each = pool(environment, tmp_path, 4, owner=1), attacker(environment, tmp_path, 5, owner=1)
        try:
            await victim.predict(b'{"do": "report"}')
            report = await ask(each, REACH_INIT)
            template = template_interpreter(each.processes[0].template)
            victim_server = server_of(victim.processes[0])
            try:
                await ask(each, KILL_EVERYTHING)
                killed = None
            except ModelUnavailable as exc:
                killed = exc.status
            await asyncio.sleep(0.5)
            status, _ = await victim.predict(b'{"do": "report"}')
            return report, killed, alive(template), alive(victim_server), status, server_of(victim.processes[0])
        finally:
            victim.close()
            each.close()

    report, killed, template_alive, victim_alive, status, victim_server_after = run(scenario)
    assert report["pid"] == 2 and report["ppid"] == 1 and report["processes"] == [1, 2]
    for key in (
        "ptrace init",
        "seize init",
        "init's memory",
        "init's environ",
        "init's descriptors",
        "init's root",
        "init's descriptor 0 by pidfd_getfd",
        "setuid 0",
        "setgroups",
        "write the uid map",
        "write init's uid map",
        "setns into init's mount namespace",
        "setns into its own user namespace",
    ):
        assert report[key] != "DONE", key
    assert report["kill -1"] in ("ProcessLookupError", "DONE")  # nothing but itself and init to signal
    # kill(0, SIGKILL) reaches its whole process group (the template's), but only its own uid's members die.
    assert killed == 502
    assert template_alive and victim_alive and status == 200


# ------------------------------------------------------------------ namespaces of its own

NESTED_NAMESPACES = r"""
import json, os
read, write = os.pipe()
child = os.fork()
if child == 0:
    out = {}
    uid = os.getuid()
    out["unshare user+mount"] = check(libc.unshare(0x10000000 | 0x00020000))
    if out["unshare user+mount"] == "DONE":
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: its /proc/self files become its own again
        def maps():
            open("/proc/self/setgroups", "w").write("deny")
            open("/proc/self/uid_map", "w").write(f"0 {uid} 1")
            open("/proc/self/gid_map", "w").write(f"0 {uid} 1")
        out["map itself"] = attempt(maps)
        for target in ("/tmp", "/proc", "/work", "/dev/shm", "/dev"):
            out["umount " + target] = check(libc.umount2(target.encode(), 2))
        out["remount /work writable"] = check(libc.mount(None, b"/work", None, 32 | 4096, None))
        out["remount / writable"] = check(libc.mount(None, b"/", None, 32 | 4096, None))
        out["remount /env writable"] = check(libc.mount(None, b"/env", None, 32 | 4096, None))
    os.write(write, json.dumps(out).encode())
    os._exit(0)
os.close(write)
result.update(json.loads(os.read(read, 65536)))
os.waitpid(child, 0)
result["user namespaces allowed"] = open("/proc/sys/user/max_user_namespaces").read().strip()
"""


def test_a_fork_cannot_make_namespaces_of_its_own(environment, tmp_path):
    """A user namespace of its own would give it every capability in it (much of the kernel to attack),
    and every namespace it made would count against the host root's quota, which created the template's
    user namespace: enough of them and no template, and no sandbox, could start any more."""

    async def scenario():
        each = attacker(environment, tmp_path, 6)
        try:
            return await ask(each, NESTED_NAMESPACES)
        finally:
            each.close()

    report = run(scenario)
    assert report["unshare user+mount"] in ("ENOSPC", "EPERM"), report
    assert report["user namespaces allowed"] == "0"


def test_uncovering_what_lies_under_a_forks_mounts_fails_even_in_a_namespace_of_its_own(environment, tmp_path):
    """The same attack with nested user namespaces allowed (as they were before the fix): the mounts
    a fork inherits are locked, so nothing under them (the template's /proc, /tmp, /work) is reached."""

    async def scenario():
        each = attacker(environment, tmp_path, 7)
        try:
            await ask(each, "result['ok'] = 1")
            template = template_interpreter(each.processes[0].template)
            # As the host's root, in the template's user namespace: let its forks make user namespaces again.
            allow = "echo 100 > /proc/sys/user/max_user_namespaces"
            subprocess.run(["nsenter", "--user", f"--target={template}", "sh", "-c", allow], check=True)
            return await ask(each, NESTED_NAMESPACES)
        finally:
            each.close()

    report = run(scenario)
    assert report["unshare user+mount"] == "DONE" and report["map itself"] == "DONE", report
    for key, value in report.items():
        if key.startswith(("umount", "remount")):
            assert value != "DONE", key


# ------------------------------------------------------------------ the file system

WRITABLE = r"""
import os
folders, files = [], []
for root, dirs, names in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys")]
    probe = os.path.join(root, ".serveml-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
        folders.append(root)
    except OSError:
        pass
    for name in names:
        path = os.path.join(root, name)
        if not os.path.islink(path) and os.access(path, os.W_OK):
            files.append(path)
proc = []
for root, dirs, names in os.walk("/proc"):
    dirs[:] = [d for d in dirs if not d.isdigit() and d not in ("self", "thread-self")]  # its own processes
    proc += [os.path.join(root, name) for name in names if os.access(os.path.join(root, name), os.W_OK)]
result["proc"] = sorted(proc)
def set_last_pid():
    with open("/proc/sys/kernel/ns_last_pid", "w") as last:
        last.write("1000")
result["set ns_last_pid"] = attempt(set_last_pid)
result["folders"] = sorted(folders)
result["files"] = sorted(files)
result["tmp size"] = os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize
result["shm size"] = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
open("/dev/shm/planted-" + str(os.getuid()), "w").write("x")
result["shm"] = sorted(os.listdir("/dev/shm"))
"""


def test_a_fork_can_write_only_its_own_tmp_and_shm(environment, tmp_path):
    async def scenario():
        first, second = attacker(environment, tmp_path, 8), attacker(environment, tmp_path, 9)
        try:
            return await ask(first, WRITABLE), await ask(second, WRITABLE)
        finally:
            first.close()
            second.close()

    first, second = run(scenario)
    for report, uid in ((first, 708), (second, 709)):
        assert report["folders"] == ["/dev/shm", "/tmp"], report["folders"]
        devices = {"/dev/full", "/dev/null", "/dev/ptmx", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"}
        assert set(report["files"]) - devices - {"/dev/pts/ptmx"} == set(), report["files"]
        # Its fresh /proc has no read-only covers: what is open to all is PSI (any process may watch
        # pressure) and ns_last_pid, whose writes need CAP_SYS_ADMIN.
        pressure = {"/proc/pressure/cpu", "/proc/pressure/io", "/proc/pressure/memory", "/proc/pressure/irq"}
        assert set(report["proc"]) <= pressure | {"/proc/sys/kernel/ns_last_pid"}, report["proc"]
        assert report["set ns_last_pid"] == "PermissionError"
        assert report["shm"] == [f"planted-{uid}"]  # not the sibling's: a /dev/shm of its own
        assert report["tmp size"] <= sandbox.Limits(memory_bytes=0, cpu_seconds=None).tmp_bytes
        assert report["shm size"] <= 1024**2


# ------------------------------------------------------------------ kernel keyrings

PLANT_KEY = r"""
KEYCTL_GET_KEYRING_ID, KEYCTL_SEARCH, KEYCTL_READ, KEYCTL_CLEAR = 0, 10, 11, 7
result["session keyring"] = libc.syscall(250, KEYCTL_GET_KEYRING_ID, -3, 0)
serial = libc.syscall(248, b"user", b"serveml-attack", b"planted", 7, -3)
result["plant a key"] = check(serial)
found = libc.syscall(250, KEYCTL_SEARCH, -3, b"user", b"serveml-host-secret", 0)
result["find the host's key"] = check(found)
if found >= 0:
    buffer = ctypes.create_string_buffer(100)
    length = libc.syscall(250, KEYCTL_READ, found, buffer, 100)
    result["host's secret"] = buffer.raw[: max(length, 0)].decode()
"""

FIND_KEY = r"""
found = libc.syscall(250, 10, -3, b"user", b"serveml-attack", 0)
result["find the attacker's key"] = check(found)
result["session keyring"] = libc.syscall(250, 0, -3, 0)
"""


def test_a_fork_shares_no_keyring_with_the_runtime_its_template_or_another_owners_fork(environment, tmp_path):
    """Under Docker (runc) every process of a container shares one session keyring, and fork() and
    bubblewrap keep it: a key planted there would reach the runtime, the template and every sibling."""
    joined = libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)  # as a container's runtime has
    assert joined > 0
    secret = b"the runtime's secret"
    assert libc.syscall(SYS_ADD_KEY, b"user", b"serveml-host-secret", secret, len(secret), KEY_SPEC_SESSION_KEYRING) > 0

    async def scenario():
        each, other = attacker(environment, tmp_path, 10, owner=1), attacker(environment, tmp_path, 11, owner=2)
        try:
            planted = await ask(each, PLANT_KEY)
            found = await ask(other, FIND_KEY)
            return planted, found
        finally:
            each.close()
            other.close()

    planted, found = run(scenario)
    on_host = libc.syscall(SYS_KEYCTL, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, b"user", b"serveml-attack", 0)
    assert planted["session keyring"] != joined
    assert planted["find the host's key"] != "DONE" and "host's secret" not in planted
    assert found["find the attacker's key"] != "DONE"
    assert on_host < 0  # nothing was planted in the runtime's keyring


# ------------------------------------------------------------------ quotas shared with the host's root

HOLD_INOTIFY = r"""
import builtins
held = []
while len(held) < 200:
    fd = libc.inotify_init1(0o2000000)
    if fd < 0:
        result["stopped by"] = check(fd)
        break
    held.append(fd)
builtins.SERVEML_HELD = held  # kept open after the answer
result["held"] = len(held)
"""


def test_a_fork_cannot_use_up_the_host_roots_inotify_instances(environment, tmp_path):
    """Kernel quotas (inotify instances and watches, namespaces, fanotify groups) count a user namespace's
    processes against its creator too, and the template's user namespace is created by the host's root."""

    async def scenario():
        each, other = attacker(environment, tmp_path, 12, owner=1), attacker(environment, tmp_path, 13, owner=2)
        try:
            await ask(other, "result['ok'] = 1")  # another owner's template, whose namespace counts against root too
            held = await ask(each, HOLD_INOTIFY)
            on_host = libc.inotify_init1(os.O_CLOEXEC)
            host_error = ctypes.get_errno()
            if on_host >= 0:
                os.close(on_host)
            return held, on_host, host_error
        finally:
            each.close()
            other.close()

    held, on_host, host_error = run(scenario)
    assert on_host >= 0, f"the host's root could not open an inotify instance ({os.strerror(host_error)}): {held}"
    assert held["held"] == 0  # a template's user namespace allows its processes none


# ------------------------------------------------------------------ outliving its deployment

SPAWN_SURVIVORS = r"""
import os, time
PR_SET_NAME = 15
def survive(name):
    libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
    while True:
        time.sleep(1)
# A double-forked, setsid grandchild, reparented to the namespace's init.
child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() == 0:
        survive("svml-survivor1")
    os._exit(0)
os.waitpid(child, 0)
# One that ignores every signal it can.
if os.fork() == 0:
    import signal
    for number in range(1, 32):
        try:
            signal.signal(number, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    survive("svml-survivor2")
result["spawned"] = True
"""


def survivors(expected: int = 0) -> list[int]:
    """The attacker's processes on the host; with `expected`, waits (a while) until that many have named themselves."""
    deadline = time.monotonic() + 5
    while len(found := _survivors()) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _survivors() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().startswith("svml-survivor"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def wait_until_gone(deadline_seconds: float = 5) -> list[int]:
    deadline = time.monotonic() + deadline_seconds
    while (left := _survivors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_nothing_a_fork_started_outlives_its_deployment_being_stopped(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 14)
        try:
            await ask(each, SPAWN_SURVIVORS)
            running = await asyncio.to_thread(survivors, 2)
        finally:
            each.close()
        return running, await asyncio.to_thread(wait_until_gone)

    running, left = run(scenario)
    assert len(running) == 2
    assert left == []


def test_nothing_a_fork_started_outlives_the_fork_exiting_on_its_own(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 15)
        try:
            await ask(each, SPAWN_SURVIVORS)
            running, template = await asyncio.to_thread(survivors, 2), each.processes[0].template
            try:
                await ask(each, "import os; os._exit(0)")
            except ModelUnavailable:
                pass
            left = await asyncio.to_thread(wait_until_gone)
            return running, left, template.alive
        finally:
            each.close()

    running, left, template_alive = run(scenario)
    assert len(running) == 2 and left == [] and template_alive


# ------------------------------------------------------------------ state left for later forks

SHARED_MAPPINGS = r"""
result["shared"] = [line for line in open("/proc/self/maps").read().splitlines() if line.split()[1][3] == "s"]
"""


def test_a_fork_shares_no_writable_memory_with_its_template_or_later_forks(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 16)
        try:
            return await ask(each, SHARED_MAPPINGS)
        finally:
            each.close()

    report = run(scenario)
    writable = [line for line in report["shared"] if line.split()[1][1] == "w"]
    assert writable == [], writable


# ------------------------------------------------------------------ a hostile package in the template

HOSTILE_PACKAGE = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def check(value):
    return "DONE" if value >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
def attempt(action):
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "DONE"
report = {"uid": os.getresuid(), "ppid": os.getppid()}
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
report["CapEff"] = status["CapEff"].strip()
report["processes"] = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            report["processes"][entry] = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            pass
report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
def connect():
    with socket.create_connection(("127.0.0.1", 5432), timeout=2):
        pass
report["host's database"] = attempt(connect)
report["root folder"] = sorted(os.listdir("/"))
report["ptrace its parent"] = check(libc.ptrace(16, os.getppid(), None, None))
report["signal its parent"] = attempt(lambda: os.kill(os.getppid(), 0))
report["parent's environ"] = attempt(lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
report["sysrq"] = attempt(lambda: open("/proc/sysrq-trigger", "w").write("h"))
report["host's kernel settings"] = attempt(lambda: open("/proc/sys/kernel/hostname", "w").write("x"))
report["session keyring"] = libc.syscall(250, 0, -3, 0)
report["find the host's key"] = check(libc.syscall(250, 10, -3, b"user", b"serveml-host-secret", 0))
def remount_env():
    if libc.unshare(0x00020000) != 0 or libc.mount(None, b"/env", None, 32 | 4096, None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
child = os.fork()
if child == 0:
    os._exit(0 if attempt(remount_env) == "DONE" else 1)
report["remount /env writable"] = "DONE" if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0 else "refused"
def raise_limit():
    with open("/proc/sys/user/max_inotify_instances", "w") as limit:
        limit.write("100000")
report["raise its namespace's limits"] = attempt(raise_limit)
child = os.fork()
if child == 0:
    os._exit(0 if libc.unshare(0x10000000) == 0 else 1)
report["user namespace"] = "DONE" if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0 else "refused"
held = []
while len(held) < 200:
    fd = libc.inotify_init1(0o2000000)
    if fd < 0:
        break
    held.append(fd)
report["inotify held"] = len(held)
sys.SERVEML_HELD = held
import signal
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
queued = 0
while queued < 200000 and libc.sigqueue(os.getpid(), signal.SIGRTMIN, None) == 0:
    queued += 1
report["signals queued"] = queued
sys.stderr.write("SERVEML-HOSTILE " + json.dumps(report) + "\n")
sys.stderr.flush()
"""


def hostile_environment(tmp_path: Path, environment: Path, code: str = HOSTILE_PACKAGE) -> Path:
    """A virtual environment whose one package runs code at interpreter start, as a .pth file can."""
    home = next(
        line.partition("=")[2].strip()
        for line in (environment / "pyvenv.cfg").read_text().splitlines()
        if line.partition("=")[0].strip() == "home"
    )
    target = tmp_path / ("hostile-env" if code else "plain-env")
    subprocess.run([f"{home}/python3", "-m", "venv", "--without-pip", str(target)], check=True)
    (site,) = target.glob("lib/python3*/site-packages")
    if code:
        (site / "serveml_hostile.py").write_text(code)
        (site / "serveml_hostile.pth").write_text("import serveml_hostile\n")
    for path in [target, *target.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def test_a_hostile_package_in_the_template_reaches_neither_the_host_nor_another_owner(environment, tmp_path):
    joined = libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)
    secret = b"the runtime's secret"
    assert libc.syscall(SYS_ADD_KEY, b"user", b"serveml-host-secret", secret, len(secret), KEY_SPEC_SESSION_KEYRING) > 0
    hostile = hostile_environment(tmp_path, environment)
    log = settings.DATA_DIR / "logs" / templates.log_name(hostile, 1)  # its own log
    start = log.stat().st_size if log.exists() else 0

    async def scenario():
        other = pool(environment, tmp_path, 17, owner=2, handler=SPY)
        try:
            await other.predict(b'{"do": "report"}')
            other_server = server_of(other.processes[0])
            template = await templates.shared.get(hostile, 1)
            on_host = libc.inotify_init1(os.O_CLOEXEC)
            if on_host >= 0:
                os.close(on_host)
            queues = await asyncio.to_thread(
                subprocess.run, ["python3", "-c", HOST_QUEUES_ONE], capture_output=True, text=True
            )
            status, _ = await other.predict(b'{"do": "report"}')
            return other_server, template.pid, (on_host, queues.stdout.strip()), status, alive(other_server)
        finally:
            other.close()

    other_server, template_pid, on_host, status, other_alive = run(scenario)
    lines = [line for line in log.read_bytes()[start:].decode().splitlines() if line.startswith("SERVEML-HOSTILE ")]
    assert lines, "the hostile package did not run"
    report = json.loads(lines[-1].split(" ", 1)[1])
    assert report["uid"] == [0, 0, 0]  # root of its own user namespace only
    assert report["interfaces"] == ["lo"] and report["host's database"] != "DONE"
    assert str(other_server) not in report["processes"]
    # It sees its own sandbox only: bubblewrap, the launcher that made its user namespace, and itself.
    sandbox_own = ("/work/serveml_userns.py", "/work/serveml_template.py")
    assert all(any(own in cmdline for own in sandbox_own) for cmdline in report["processes"].values()), report
    for key in (
        "ptrace its parent",
        "signal its parent",
        "parent's environ",
        "sysrq",
        "host's kernel settings",
        "raise its namespace's limits",
        "user namespace",
    ):
        assert report[key] != "DONE", key
    assert report["remount /env writable"] != "DONE"
    assert report["session keyring"] != joined and report["find the host's key"] != "DONE"
    assert status == 200 and other_alive
    inotify, queued = on_host
    assert report["inotify held"] == 0 and report["signals queued"] <= 64, report
    assert inotify >= 0, f"the template holds {report['inotify held']} of the host root's inotify instances"
    assert queued == "queued", f"the template holds {report['signals queued']} of the host root's pending signals"
    assert template_pid


def test_templates_are_never_shared_between_owners_or_environments(environment, tmp_path):
    async def scenario():
        one = await templates.shared.get(environment, 1)
        again = await templates.shared.get(environment, 1)
        other_owner = await templates.shared.get(environment, 2)
        other_environment = await templates.shared.get(hostile_environment(tmp_path, environment, code=""), 1)
        return one, again, other_owner, other_environment

    one, again, other_owner, other_environment = run(scenario)
    assert one is again
    assert len({id(one), id(other_owner), id(other_environment)}) == 3
    assert len({one.pid, other_owner.pid, other_environment.pid}) == 3


# ------------------------------------------------------------------ a template that lies to the runtime

# Takes the template over before serveml_template.py runs, and answers each fork with something that
# is not a pidfd: a descriptor of /dev/null, or a message that is not JSON with one attached.
LIAR = r"""
import json, os, socket, sys
if len(sys.argv) > 1 and sys.argv[0].endswith("serveml_template.py"):
    control = socket.socket(fileno=int(sys.argv[1]))
    control.send(json.dumps({"ready": []}).encode())
    answers = 0
    while True:
        data, fds, _, _ = socket.recv_fds(control, 65536, 16)
        if not data:
            os._exit(0)
        for fd in fds:
            os.close(fd)
        message = json.dumps({"pid": 1}).encode() if answers % 2 == 0 else b"\xff not json"
        socket.send_fds(control, [message], [os.open("/dev/null", os.O_RDONLY)])
        answers += 1
"""


def test_a_template_that_answers_forks_with_lies_leaks_no_descriptor_into_the_runtime(environment, tmp_path):
    liar = hostile_environment(tmp_path, environment, code=LIAR)

    async def scenario():
        refusals = []
        each = pool(liar, tmp_path, 18)
        try:
            for _ in range(2):  # the template starts; one answer of each kind
                try:
                    await each.predict(b"{}")
                except (ModelUnavailable, ValueError) as exc:
                    refusals.append(type(exc).__name__)
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(10):
                try:
                    await each.predict(b"{}")
                except (ModelUnavailable, ValueError) as exc:
                    refusals.append(type(exc).__name__)
            after = len(os.listdir("/proc/self/fd"))
            return refusals, before, after
        finally:
            each.close()

    refusals, before, after = run(scenario)
    assert refusals == ["ModelUnavailable"] * 12, refusals
    assert after == before, f"{after - before} descriptors the template sent were left open in the runtime"


# ------------------------------------------------------------------ its limits, not its siblings'

FORK_BOMB = r"""
import builtins, os, signal, time
children = []
while len(children) < 1000:
    try:
        child = os.fork()
    except OSError as exc:
        result["stopped by"] = type(exc).__name__
        break
    if child == 0:
        signal.pause()
        os._exit(0)
    children.append(child)
builtins.SERVEML_CHILDREN = children
result["forked"] = len(children)
"""

ONE_FORK = r"""
import os
child = os.fork()
if child == 0:
    os._exit(7)
result["child exit"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
"""


def test_a_fork_bomb_stops_at_its_own_limit_and_its_siblings_and_template_still_fork(environment, tmp_path):
    async def scenario():
        bomb, sibling = attacker(environment, tmp_path, 19), attacker(environment, tmp_path, 20)
        try:
            await ask(sibling, "result['ok'] = 1")
            bombed = await ask(bomb, FORK_BOMB)
            forked = await ask(sibling, ONE_FORK)
            later = attacker(environment, tmp_path, 21)  # a new fork of the same template, for another deployment
            try:
                started = await ask(later, ONE_FORK)
            finally:
                later.close()
            return bombed, forked, started
        finally:
            bomb.close()
            sibling.close()

    bombed, forked, started = run(scenario)
    limit = sandbox.Limits(memory_bytes=0, cpu_seconds=None).processes
    assert bombed["stopped by"] == "BlockingIOError" and bombed["forked"] < limit, bombed
    assert forked["child exit"] == 7 and started["child exit"] == 7


PENDING_SIGNALS = r"""
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
queued = 0
while queued < 200000:
    if libc.sigqueue(os.getpid(), signal.SIGRTMIN, None) != 0:  # queued one entry each while blocked
        result["stopped by"] = check(-1)
        break
    queued += 1
result["queued"] = queued
"""

HOST_QUEUES_ONE = (
    "import ctypes, os, signal; libc = ctypes.CDLL(None, use_errno=True); "
    "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN]); "
    "print('queued' if libc.sigqueue(os.getpid(), signal.SIGRTMIN, None) == 0 else os.strerror(ctypes.get_errno()))"
)


def test_a_fork_cannot_use_up_the_host_roots_pending_signals(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 22)
        try:
            queued = await ask(each, PENDING_SIGNALS)
            host = await asyncio.to_thread(
                subprocess.run, ["python3", "-c", HOST_QUEUES_ONE], capture_output=True, text=True
            )
            return queued, host
        finally:
            each.close()

    queued, host = run(scenario)
    assert host.stdout.strip() == "queued", (queued, host.stdout, host.stderr[-300:])


MESSAGE_QUEUES = r"""
import os
libc.mq_open.restype = ctypes.c_int
made = 0
while made < 200:
    if libc.mq_open(f"/serveml-{made}".encode(), os.O_CREAT | os.O_RDWR, 0o600, None) < 0:
        result["stopped by"] = check(-1)
        break
    made += 1  # each one holds its 80 KB of the quota until its IPC namespace ends
result["made"] = made
"""

HOST_MAKES_A_QUEUE = (
    "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    "fd = libc.mq_open(b'/serveml-attack-test', os.O_CREAT | os.O_RDWR, 0o600, None); "
    "print('made' if fd >= 0 else os.strerror(ctypes.get_errno())); libc.mq_unlink(b'/serveml-attack-test')"
)


def test_a_fork_cannot_use_up_the_host_roots_message_queue_bytes(environment, tmp_path):
    async def scenario():
        each = attacker(environment, tmp_path, 23)
        try:
            made = await ask(each, MESSAGE_QUEUES)
            host = await asyncio.to_thread(
                subprocess.run, ["python3", "-c", HOST_MAKES_A_QUEUE], capture_output=True, text=True
            )
            return made, host
        finally:
            each.close()

    made, host = run(scenario)
    assert host.stdout.strip() == "made", (made, host.stdout, host.stderr[-300:])


# ------------------------------------------------------------------ the same keyring attack without templates

KEYRING_PROBE = (
    "import ctypes; libc = ctypes.CDLL(None, use_errno=True); libc.syscall.restype = ctypes.c_long; "
    "found = libc.syscall(250, 10, -3, b'user', b'serveml-host-secret', 0); "
    "buffer = ctypes.create_string_buffer(100); "
    "length = libc.syscall(250, 11, found, buffer, 100) if found >= 0 else -1; "
    "print(buffer.raw[: max(length, 0)].decode() or 'not found')"
)


def test_a_sandboxed_process_started_alone_shares_no_keyring_with_the_runtime(environment):
    """sandbox.launch (the validate probe; model processes when templates are off): bubblewrap, setpriv
    and unshare all keep the runtime's session keyring."""
    from tests.test_sandbox import run_code

    assert libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) > 0
    secret = b"the runtime's secret"
    assert libc.syscall(SYS_ADD_KEY, b"user", b"serveml-host-secret", secret, len(secret), KEY_SPEC_SESSION_KEYRING) > 0
    result = run_code(environment, KEYRING_PROBE, uid=sandbox.uid_for(724))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "not found"
