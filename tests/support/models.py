"""Finding a deployment's model processes from the host, as an operator would: by its uid.

Each deployment's model processes run as its own uid (deployments/sandbox.py's uid_for),
whether forked from a warm template (whose command line they keep) or started alone.
Only this test session's own processes count: another ServeML on the host (a developer's,
a benchmark's) numbers its deployments from 1 too, so the same uids may run there.
"""

import os
from pathlib import Path


def _processes() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent, real uid, command line), from one pass over /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[int(entry.name)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]), cmdline)
    return found


def pids_of_uid(uid: int, ancestor: int | None = None) -> list[int]:
    """The model interpreters (not what they started) running as `uid` below `ancestor`
    (this test session's process by default)."""
    ancestor = os.getpid() if ancestor is None else ancestor
    processes = _processes()

    def below(pid: int) -> bool:
        while pid > 1:
            pid = processes.get(pid, (0,))[0]
            if pid == ancestor:
                return True
        return False

    return [
        pid
        for pid, (_, real_uid, cmdline) in processes.items()
        if real_uid == uid and cmdline.startswith(b"/env/bin/python") and below(pid)
    ]


def model_pids(public_id) -> list[int]:
    from deployments import sandbox
    from deployments.models import Deployment

    return pids_of_uid(sandbox.uid_for(Deployment.objects.get(public_id=public_id).pk))
