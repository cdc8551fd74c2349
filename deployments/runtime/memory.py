"""What the runtime's model processes hold in memory, and the budget that unloads the least used.

Model processes forked from a template share most of their pages with it, so
their resident sizes add up to many times what they use. The budget counts
proportional set size (PSS: each shared page divided among the processes that
map it), which adds up to the real total: templates, the processes forked from
them and the ones started alone, each with everything it started.
"""

import logging
import os

log = logging.getLogger("serveml.runtime")


def children_of() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    return children


def tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def pss(pid: int) -> int:
    """Proportional set size in bytes; 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def usage(pools: dict, template_pids: list[int]) -> tuple[int, dict[str, int]]:
    """(all model memory, each pool's share of it) in bytes. Templates count in the total
    only: unloading one deployment does not stop them."""
    children = children_of()
    trees = {
        version_id: [pid for process in pool.processes if process.pid for pid in tree(process.pid, children)]
        for version_id, pool in list(pools.items())
    }
    per_pool = {version_id: sum(pss(pid) for pid in pids) for version_id, pids in trees.items()}
    # A forked process's parent is its template's sandbox: its share is in per_pool already.
    counted = {pid for pids in trees.values() for pid in pids}
    templates = sum(pss(pid) for template in template_pids for pid in tree(template, children) if pid not in counted)
    return templates + sum(per_pool.values()), per_pool


def over_budget(pools: dict, template_pids: list[int], budget: int) -> list[str]:
    """The pools to stop, least recently used first, to bring model memory under `budget`;
    pools answering requests are never chosen."""
    total, per_pool = usage(pools, template_pids)
    if total <= budget:
        return []
    chosen = []
    for version_id, pool in sorted(pools.items(), key=lambda item: item[1].last_used):
        if total <= budget:
            break
        if pool.busy:
            continue
        chosen.append(version_id)
        total -= per_pool.get(version_id, 0)
    if total > budget:
        log.warning(
            "model memory stays at %d MB over the budget of %d MB: every other deployment is answering requests",
            total // 1024**2,
            budget // 1024**2,
        )
    return chosen
