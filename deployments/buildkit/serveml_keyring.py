"""A new, empty session keyring for whatever runs next.

fork() and bubblewrap keep the caller's session keyring (under Docker, one for the
whole container), so every sandboxed process would share the runtime's keys and
could plant keys for another tenant to find. Run by the host's own Python (-I -S)
inside a sandbox, as the deployment's uid, just before the model's interpreter:

    python -I -S serveml_keyring.py COMMAND [ARGS...]

and imported by serveml_userns.py and serveml_template.py. Stdlib only.
"""

import ctypes
import errno
import os
import sys

# keyctl(2) has no libc wrapper: its number, by architecture.
KEYCTL_SYSCALL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 271, "ppc64": 271, "s390x": 280}
KEYCTL_JOIN_SESSION_KEYRING = 1


def new_session_keyring() -> None:
    """Leave the session keyring this process was given for a new, empty one of its own (charged
    to the caller's uid); raises OSError when that cannot be done."""
    number = KEYCTL_SYSCALL.get(os.uname().machine)
    if number is None:
        raise OSError(f"no keyctl system call number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        error = ctypes.get_errno()
        if error != errno.ENOSYS:  # a kernel without keyrings shares none
            raise OSError(error, f"cannot join a new session keyring: {os.strerror(error)}")


if __name__ == "__main__":
    try:
        new_session_keyring()
    except OSError as exc:
        sys.exit(f"serveml_keyring: {exc}; nothing was started")
    os.execvp(sys.argv[1], sys.argv[1:])
