"""What a process tree holds in memory, read from /proc: RSS, private memory (USS), the peak of a
tree under load, and which of the runtime's processes belong to a deployment."""

import threading
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    return sum(rss(p) for p in descendants(pid))


def private(pid: int) -> int:
    """Memory only this process holds (USS), in bytes: what one more model process costs.

    RSS also counts pages of shared libraries that every process of an environment maps
    from the same files; which of those pages happen to be resident varies by a few MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


class PeakMemory:
    """The largest `tree_rss(pid)` seen while the block runs, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while self.running:
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def command_line(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def model_processes(runtime_pid: int, deployment_id: str) -> list[int]:
    """The deployment's model processes: the interpreters inside its sandboxes (not bubblewrap),
    whose command line carries its id as a label."""
    found = []
    for pid in descendants(runtime_pid):
        argv = command_line(pid)
        if argv[0] == b"/env/bin/python" and deployment_id.encode() in argv:
            found.append(pid)
    return found


def environment_of(runtime_pid: int, deployment_id: str) -> Path:
    """The deployment's own environment, as its sandbox binds it at /env."""
    for pid in descendants(runtime_pid):
        argv = command_line(pid)
        if argv[0].endswith(b"bwrap") and deployment_id.encode() in argv:
            return Path(argv[argv.index(b"/env") - 1].decode())
    raise RuntimeError(f"no sandbox of {deployment_id} is running")
