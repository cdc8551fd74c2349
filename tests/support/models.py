"""Finding a deployment's model processes from the host, as an operator would: by its uid.

Each deployment's model processes run as its own uid (deployments/sandbox.py's uid_for),
whether forked from a warm template (whose command line they keep) or started alone.
Only this test session's own processes count: another ServeML on the host (a developer's,
a benchmark's) numbers its deployments from 1 too, so the same uids may run there.
"""

import os
from pathlib import Path


def host_processes() -> dict[int, dict]:
    """Every process on the host: its uid, parent and command line, read from the host's /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[int(entry.name)] = {"uid": int(fields["Uid"].split()[0]), "ppid": int(fields["PPid"]), "cmdline": cmdline}
    return found


def pids_of_uid(uid: int, ancestor: int | None = None) -> list[int]:
    """The model interpreters running as `uid` (one per model process: not what they started, nor
    the model server a forked process's namespace init starts), below `ancestor` when given."""
    processes = host_processes()

    def below(pid: int) -> bool:
        while pid > 1:
            pid = processes[pid]["ppid"] if pid in processes else 0
            if pid == ancestor:
                return True
        return False

    def interpreter(pid: int) -> bool:
        info = processes.get(pid)
        return info is not None and info["uid"] == uid and info["cmdline"].startswith("/env/bin/python")

    return [
        pid
        for pid, info in processes.items()
        if interpreter(pid) and not interpreter(info["ppid"]) and (ancestor is None or below(pid))
    ]


def model_pids(public_id) -> list[int]:
    from deployments import sandbox
    from deployments.models import Deployment

    return pids_of_uid(sandbox.uid_for(Deployment.objects.get(public_id=public_id).pk), ancestor=os.getpid())
