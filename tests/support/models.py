"""Finding a deployment's model processes from the host, as an operator would: by its uid.

Each deployment's model processes run as its own uid (deployments/sandbox.py's uid_for),
whether forked from a warm template (whose command line they keep) or started alone.
"""

from pathlib import Path


def pids_of_uid(uid: int) -> list[int]:
    """The model interpreters (not what they started) running as `uid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        real_uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        if real_uid == uid and cmdline.startswith(b"/env/bin/python"):
            found.append(int(entry.name))
    return found


def model_pids(public_id) -> list[int]:
    from deployments import sandbox
    from deployments.models import Deployment

    return pids_of_uid(sandbox.uid_for(Deployment.objects.get(public_id=public_id).pk))
