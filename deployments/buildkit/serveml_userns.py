"""Starts a warm template in a user namespace of its own (deployments/runtime/templates.py).

Run inside the template's bubblewrap sandbox, as root, by the host's own Python
with -I -S (so nothing from the model's environment runs here):

    serveml_userns.py BASE COUNT -- /env/bin/python -I -B serveml_template.py ...

It mounts a /proc for the sandbox's PID namespace (bubblewrap's own /proc has
read-only covers that would stop a namespaced process from mounting a fresh
one), forks, and the child creates a user namespace. This process, still root
outside it, writes the child's uid and gid maps: inside uid k is host uid
BASE + k for k < COUNT, so uid 0 inside (the template) is the unprivileged
BASE on the host, and the template can give each model process it forks
deployment N's own uid, N (host BASE + N), and nothing else. util-linux's
`unshare --map-users` would need newuidmap and /etc/subuid entries; the two
writes below are all it takes as root.

The child then becomes uid 0 of its namespace and executes the template with
no-new-privileges. This process waits for it and exits with its status.

Two things a user namespace shares with whoever created it are cut off first:

  - the session keyring: fork() and bubblewrap keep the runtime's (under Docker,
    one for the whole container), so the child joins a new one before anything
    of the environment runs;
  - kernel quotas: a namespace's processes count against its creator's quotas
    too, and the creator here is the host's root. The child sets the namespace's
    own limits for what no template or model process needs (user namespaces,
    inotify, fanotify) to 0, lowers its pending signals and POSIX message queue
    rlimits, and gives up CAP_SYS_RESOURCE, the capability that could raise the
    namespace's limits again. Otherwise a model could hold all of the host root's
    inotify instances (128 by default) or queued signals, or make user
    namespaces until no sandbox on the host can start.
Stdlib only.
"""

import ctypes
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
CAP_SYS_RESOURCE = 24
# The namespace's own limits (per uid inside it), set to 0: none of these is needed inside.
UNNEEDED = ("max_user_namespaces", "max_inotify_instances", "max_inotify_watches")
UNNEEDED_IF_PRESENT = ("max_fanotify_groups", "max_fanotify_marks")
PENDING_SIGNALS = 64  # the template's queued real-time signals (each model process is limited again)
# Each fork takes a mount, PID, network, IPC and UTS namespace, all counted against the host root's
# quotas too (root made this namespace): a template holds at most this many of each, so code in it
# cannot create namespaces until no sandbox on the host can start.
NAMESPACES_PER_TEMPLATE = 4096
NAMESPACE_KINDS = ("net", "mnt", "pid", "ipc", "uts", "cgroup", "time")


def limit_namespace(libc) -> None:
    """In the new user namespace, as its root: nothing inside may use the host root's quotas."""
    for name in (*UNNEEDED, *UNNEEDED_IF_PRESENT):
        path = f"/proc/sys/user/{name}"
        if name in UNNEEDED or os.path.exists(path):
            with open(path, "w") as limit:
                limit.write("0")
    for kind in NAMESPACE_KINDS:
        path = f"/proc/sys/user/max_{kind}_namespaces"
        if os.path.exists(path):
            with open(path, "w") as limit:
                limit.write(str(NAMESPACES_PER_TEMPLATE))
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (PENDING_SIGNALS, PENDING_SIGNALS))
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop CAP_SYS_RESOURCE")


def main(base: int, count: int, command: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        sys.exit(f"serveml_userns: cannot mount /proc: {os.strerror(ctypes.get_errno())}")
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(from_parent)
        os.close(to_parent)
        try:
            new_session_keyring()  # as the host's root: its quota, not the namespace's
        except OSError as exc:
            os.write(2, f"serveml_userns: {exc}\n".encode())
            os._exit(72)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os.write(2, f"serveml_userns: unshare: {os.strerror(ctypes.get_errno())}\n".encode())
            os._exit(70)
        os.write(from_child, b"u")
        if os.read(to_child, 1) != b"m":  # the parent could not write the maps
            os._exit(71)
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
        try:
            limit_namespace(libc)
        except OSError as exc:
            os.write(2, f"serveml_userns: cannot limit the namespace: {exc}\n".encode())
            os._exit(73)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.execv(command[0], command)
    os.close(to_child)
    os.close(from_child)
    if os.read(to_parent, 1) != b"u":
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) or 70
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as map_file:
            map_file.write(f"0 {base} {count}\n")
    os.write(from_parent, b"m")
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves it out
    from serveml_keyring import new_session_keyring

    separator = sys.argv.index("--")
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[separator + 1 :]))
