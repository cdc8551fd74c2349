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
Stdlib only.
"""

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
PR_SET_NO_NEW_PRIVS = 38


def main(base: int, count: int, command: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        sys.exit(f"serveml_userns: cannot mount /proc: {os.strerror(ctypes.get_errno())}")
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(from_parent)
        os.close(to_parent)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os.write(2, f"serveml_userns: unshare: {os.strerror(ctypes.get_errno())}\n".encode())
            os._exit(70)
        os.write(from_child, b"u")
        if os.read(to_child, 1) != b"m":  # the parent could not write the maps
            os._exit(71)
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
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
    separator = sys.argv.index("--")
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[separator + 1 :]))
