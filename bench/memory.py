"""What a process tree holds in memory, read from /proc: RSS, private memory (USS), the peak of a
tree under load, and which of the runtime's processes belong to a deployment."""

import threading
import time
from pathlib import Path

from deployments.runtime.memory import children_of, tree


def descendants(pid: int) -> list[int]:
    """A process and all its descendants (one pass over /proc, as the runtime's budget does)."""
    return tree(pid, children_of())


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
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return 0  # gone meanwhile
    fields = {}
    for line in lines:
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


def uid_of(pid: int) -> int | None:
    """The process's real uid as the host sees it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def model_processes(runtime_pid: int, uid: int) -> list[int]:
    """A deployment's model processes: the interpreters under the runtime running as the
    deployment's own uid (not bubblewrap, nor a sandbox's init). Whether started on their own or
    forked from a warm template (whose command line they keep), they run as that uid."""
    return [
        pid for pid in descendants(runtime_pid) if uid_of(pid) == uid and command_line(pid)[0] == b"/env/bin/python"
    ]
