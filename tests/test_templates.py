"""Warm templates (deployments/runtime/templates.py, buildkit/serveml_template.py), with real
sandboxes and real forked model processes, looked at from inside (as a hostile model would)
and from the host."""

import asyncio
import json
import os
import signal
import time

import pytest
from django.test import override_settings

from deployments import sandbox
from deployments.runtime import memory, templates
from deployments.runtime.access import Access
from deployments.runtime.pool import ModelPool
from deployments.runtime.process import ModelUnavailable
from deployments.runtime.registry import Spec
from tests.conftest import stand_in_build
from tests.test_sandbox import environment, host_processes, no_bubblewrap  # noqa: F401  (fixtures)

# A model that reports what it can see and do from inside its process.
SPY = r"""
import json, os, signal, socket

def model():
    pass

def handle_many(bodies):
    return [handle(json.loads(body)) for body in bodies]

def attempt(action):
    try:
        action()
        return "DONE"
    except OSError as exc:
        return type(exc).__name__

def handle(request):
    if request.get("do") == "listen":
        global LISTENER
        LISTENER = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        LISTENER.bind("\0serveml-test-" + request["name"])
        LISTENER.listen()
        open("/tmp/mine", "w").write("x")
        return 200, b"{}"
    if request.get("do") == "exit":
        os._exit(3)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    def connect():
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect("\0serveml-test-" + request.get("name", ""))
    def write_work():
        open("/work/planted", "w").write("x")
    def overwrite_model():
        open("/work/model.pkl", "w").write("x")
    report = {
        "pid": os.getpid(),
        "processes": sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()),
        "uid": os.getresuid(),
        "CapEff": status["CapEff"].strip(), "CapPrm": status["CapPrm"].strip(), "CapBnd": status["CapBnd"].strip(),
        "NoNewPrivs": status["NoNewPrivs"].strip(),
        "work": sorted(os.listdir("/work")),
        "tmp": sorted(os.listdir("/tmp")),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "connect other tenant": attempt(connect),
        "write /work": attempt(write_work),
        "overwrite model": attempt(overwrite_model),
        "setuid 0": attempt(lambda: os.setuid(0)),
        "kill init": attempt(lambda: os.kill(1, signal.SIGKILL)),
        "read env folder": sorted(os.listdir("/env"))[:3],
    }
    return 200, json.dumps(report).encode()
"""

ROW = b'{"do": "report"}'


def pool(environment, tmp_path, number: int, owner: int = 1, handler: str = SPY) -> ModelPool:
    build = tmp_path / f"deployment-{number}"
    model = stand_in_build(build, handler)
    spec = Spec(
        f"0f0e0d0c-0000-4000-8000-0000000007{number:02d}",
        environment,
        build,
        model,
        sandbox.uid_for(700 + number),
        owner=owner,
    )
    return ModelPool(spec, Access(), max_size=1)


def run(scenario):
    async def whole():
        try:
            return await scenario()
        finally:
            templates.shared.stop_all()

    return asyncio.run(whole())


def namespaces(pid: int) -> dict[str, str]:
    return {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in ("pid", "mnt", "net", "ipc", "uts", "user")}


def server_of(process) -> int:
    """The model server: the only child of the namespace's init, which the pool holds."""
    (server,) = memory.children_of()[process.pid]
    return server


def test_one_owners_deployments_share_a_template_and_another_owner_gets_its_own(environment, tmp_path):
    async def scenario():
        first, second, other = (
            pool(environment, tmp_path, 1, owner=1),
            pool(environment, tmp_path, 2, owner=1),
            pool(environment, tmp_path, 3, owner=2),
        )
        try:
            answers = [json.loads((await each.predict(ROW))[1]) for each in (first, second, other)]
            forks = [each.processes[0] for each in (first, second, other)]
            servers = [server_of(fork) for fork in forks]
            return answers, [fork.template for fork in forks], servers, host_processes()
        finally:
            for each in (first, second, other):
                each.close()

    answers, used, servers, seen = run(scenario)
    assert used[0] is used[1] and used[2] is not used[0]
    assert used[0].pid != used[2].pid
    assert [seen[server]["uid"] for server in servers] == [
        sandbox.uid_for(701),
        sandbox.uid_for(702),
        sandbox.uid_for(703),
    ]
    assert all("serveml_template.py" in seen[server]["cmdline"] for server in servers)  # forks, not new interpreters
    assert [answer["uid"] for answer in answers] == [[701] * 3, [702] * 3, [703] * 3]  # as the namespace maps them


def test_a_forked_model_process_is_isolated_from_its_template_and_its_siblings(environment, tmp_path):
    async def scenario():
        victim, attacker = pool(environment, tmp_path, 4), pool(environment, tmp_path, 5)
        try:
            await victim.predict(b'{"do": "listen", "name": "victim"}')
            _, report = await attacker.predict(b'{"do": "report", "name": "victim"}')
            fork = attacker.processes[0]
            again, _ = await attacker.predict(ROW)  # its init ignored the kill: the namespace still stands
            assert again == 200 and fork.alive and attacker.processes[0] is fork
            template = fork.template.pid
            template_interpreter = max(memory.tree(template, memory.children_of()))  # the last one it started
            return (
                json.loads(report),
                namespaces(server_of(fork)),
                namespaces(server_of(victim.processes[0])),
                template_interpreter,
                server_of(fork),
            )
        finally:
            victim.close()
            attacker.close()

    report, own, victims, template_pid, server = run(scenario)
    # Inside: only itself and its namespace's init; not root; no capability at all; nothing new.
    assert report["processes"] == [1, 2] and report["pid"] == 2
    assert report["uid"] == [705, 705, 705]
    assert report["CapEff"] == report["CapPrm"] == report["CapBnd"] == "0000000000000000"
    assert report["NoNewPrivs"] == "1"
    assert report["setuid 0"] == "PermissionError"
    assert report["kill init"] in ("DONE", "PermissionError")  # ignored: init is PID 1 of the namespace
    # Its files only, read-only; a /tmp of its own (the victim's /tmp/mine is not there).
    assert report["work"] == ["model.pkl", "serveml.json", "serveml_handler.py", "serveml_loader.py"]
    assert report["write /work"] != "DONE" and report["overwrite model"] != "DONE"
    assert report["tmp"] == []
    # No network, and another tenant's abstract socket is out of reach (namespaces of its own).
    assert report["interfaces"] == ["lo"]
    assert report["connect other tenant"] == "ConnectionRefusedError"
    for name in ("pid", "mnt", "net", "ipc", "uts"):
        assert own[name] != victims[name], name
        assert own[name] != namespaces(os.getpid())[name], name
    assert own["user"] != namespaces(os.getpid())["user"]


def test_the_template_is_not_root_on_the_host(environment, tmp_path):
    async def scenario():
        each = pool(environment, tmp_path, 6)
        try:
            await each.predict(ROW)
            template = each.processes[0].template
            return memory.tree(template.pid, memory.children_of()), host_processes()
        finally:
            each.close()

    tree, seen = run(scenario)
    interpreters = [pid for pid in tree if seen.get(pid, {}).get("cmdline", "").startswith("/env/bin/python")]
    assert interpreters
    # The template and everything it forked run as unprivileged uids of the sandbox's range.
    assert all(seen[pid]["uid"] >= sandbox.builder_uid() for pid in interpreters)
    template_uid = min(seen[pid]["uid"] for pid in interpreters)
    assert template_uid == sandbox.builder_uid()


def test_a_killed_template_fails_what_its_processes_held_and_the_next_request_starts_a_new_one(environment, tmp_path):
    async def scenario():
        each = pool(environment, tmp_path, 7)
        try:
            await each.predict(ROW)
            first = each.processes[0].template
            sandbox.kill_group(first.pid)
            deadline = time.monotonic() + 10
            while each.processes[0].alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            status, _ = await each.predict(ROW)  # a fresh template, a fresh fork
            return first, each.processes[0].template, status
        finally:
            each.close()

    first, second, status = run(scenario)
    assert status == 200 and second is not first and second.pid != first.pid


def test_a_model_process_that_exits_is_replaced_by_a_new_fork(environment, tmp_path):
    async def scenario():
        each = pool(environment, tmp_path, 8)
        try:
            first = each.processes[0] if each.processes else None
            await each.predict(ROW)
            first = each.processes[0].pid
            with pytest.raises(ModelUnavailable) as crashed:
                await each.predict(b'{"do": "exit"}')
            status, _ = await each.predict(ROW)
            return first, each.processes[0].pid, crashed.value, status, each.processes[0].template.children
        finally:
            each.close()

    first, second, crashed, status, children = run(scenario)
    assert crashed.status == 502 and "crashed while answering" in crashed.message
    assert status == 200 and second != first
    assert children == 1  # the dead one was counted out


def test_an_idle_template_is_stopped_and_one_with_processes_is_kept(environment, tmp_path, settings):
    settings.SERVEML_TEMPLATE_IDLE_SECONDS = 60

    async def scenario():
        each = pool(environment, tmp_path, 9)
        await each.predict(ROW)
        template = each.processes[0].template
        templates.shared.sweep(now=time.monotonic() + 3600)
        kept = template.alive
        each.close()
        templates.shared.sweep(now=time.monotonic() + 30)
        kept_while_recent = template.alive
        templates.shared.sweep(now=time.monotonic() + 61)
        return kept, kept_while_recent, template.alive, dict(templates.shared.templates), templates.shared.starting

    kept, kept_while_recent, alive_after, left, locks = run(scenario)
    assert kept and kept_while_recent
    assert not alive_after and not left
    assert not locks  # nor the lock its start took: one per (environment, owner) ever served would pile up


def test_without_bubblewrap_a_template_fails_closed_with_what_to_install(environment, tmp_path, no_bubblewrap):  # noqa: F811
    async def scenario():
        each = pool(environment, tmp_path, 10)
        with pytest.raises(ModelUnavailable) as refused:
            await each.predict(ROW)
        return refused.value, dict(templates.shared.templates)

    refused, left = run(scenario)
    assert refused.status == 503 and "bwrap not found" in refused.message and "bubblewrap" in refused.message
    assert not left


def test_a_uid_outside_the_namespaces_range_is_refused(environment, tmp_path, settings):
    settings.SERVEML_SANDBOX_UID_COUNT = 700  # deployment 711 is past the range

    async def scenario():
        each = pool(environment, tmp_path, 11)
        with pytest.raises(ModelUnavailable) as refused:
            await each.predict(ROW)
        return refused.value

    refused = run(scenario)
    assert refused.status == 503 and "SERVEML_SANDBOX_UID_COUNT" in refused.message


@override_settings(SERVEML_TEMPLATES=False)
def test_with_templates_off_each_model_process_starts_its_own_interpreter(environment, tmp_path):
    async def scenario():
        each = pool(environment, tmp_path, 12)
        try:
            status, report = await each.predict(ROW)
            return status, json.loads(report), each.processes[0].template, dict(templates.shared.templates)
        finally:
            each.close()

    status, report, template, started = run(scenario)
    assert status == 200 and template is None and not started
    assert report["CapEff"] == "0000000000000000" and report["NoNewPrivs"] == "1"


def test_the_memory_budget_stops_the_least_recently_used_deployment_and_it_comes_back(environment, tmp_path, settings):
    from deployments.runtime.app import Runtime

    async def scenario():
        runtime = Runtime(max_processes=1)
        pools = [pool(environment, tmp_path, 20 + n) for n in range(3)]
        for each in pools:
            runtime.pools[each.spec.deployment_id] = each
            await each.predict(ROW)
        pools[0].last_used = time.monotonic() - 5  # the least recently used
        total, shares = await asyncio.to_thread(memory.usage, dict(runtime.pools), templates.shared.pids())
        settings.SERVEML_RUNTIME_MEMORY_BYTES = total - min(shares.values()) // 2  # one must go
        stopped = await runtime.keep_to_budget()
        left = sorted(runtime.pools)
        settings.SERVEML_RUNTIME_MEMORY_BYTES = total * 10
        unchanged = await runtime.keep_to_budget()
        again = ModelPool(pools[0].spec, Access(), max_size=1)  # its next request: loaded again
        status, _ = await again.predict(ROW)
        for each in [*runtime.pools.values(), again]:
            each.close()
        return pools, stopped, left, unchanged, status, total, shares

    pools, stopped, left, unchanged, status, total, shares = run(scenario)
    assert stopped == [pools[0].spec.deployment_id]
    assert left == sorted(each.spec.deployment_id for each in pools[1:])
    assert pools[0].closed and not pools[0].processes
    assert unchanged == [] and status == 200
    # Forked processes share the template's pages: each holds a few MB of its own, not an interpreter's 75.
    assert all(share < 30 * 1024**2 for share in shares.values()), shares


def test_a_forked_processs_memory_is_counted_once_in_the_total(environment, tmp_path):
    async def scenario():
        each = pool(environment, tmp_path, 30)
        try:
            await each.predict(ROW)
            total, shares = memory.usage({"x": each}, templates.shared.pids())
            return total, shares, each.processes[0].template.pid
        finally:
            each.close()

    total, shares, template = run(scenario)
    assert 0 < shares["x"] < total  # the template's share is in the total, not in the deployment's
    assert total < 400 * 1024**2


LIMITS_SPY = """
import json

def model():
    pass

def handle_many(bodies):
    kinds = ("net", "mnt", "pid", "ipc", "uts", "user")
    limits = {kind: int(open(f"/proc/sys/user/max_{kind}_namespaces").read()) for kind in kinds}
    return [(200, json.dumps(limits).encode()) for _ in bodies]
"""


def test_a_template_holds_a_bounded_number_of_namespaces_of_each_kind(environment, tmp_path):
    """Its user namespace was made by the host's root, so every namespace made in it counts against root's
    quotas too: code in a template must not be able to make namespaces until no sandbox on the host starts."""

    async def scenario():
        each = pool(environment, tmp_path, 40, handler=LIMITS_SPY)
        try:
            return json.loads((await each.predict(ROW))[1])
        finally:
            each.close()

    limits = run(scenario)
    assert limits.pop("user") == 0  # nothing inside needs a user namespace
    assert limits == {kind: 4096 for kind in ("net", "mnt", "pid", "ipc", "uts")}


def test_the_sweep_leaves_a_template_that_is_still_starting_alone(environment, tmp_path):
    """The sweep runs on the same loop: between a template's creation and its sandbox's start it is not
    alive yet, and stopping it then failed the model process that asked for it."""

    async def scenario():
        each = pool(environment, tmp_path, 41)
        try:
            predicting = asyncio.get_running_loop().create_task(each.predict(ROW))
            while not templates.shared.templates:  # the template exists, its sandbox not yet
                await asyncio.sleep(0)
            starting = next(iter(templates.shared.templates.values()))
            swept_while_starting = starting.transport is None
            templates.shared.sweep()
            status, _ = await predicting
            return swept_while_starting, status, starting.alive
        finally:
            each.close()

    swept_while_starting, status, alive = run(scenario)
    assert swept_while_starting
    assert status == 200 and alive


def test_a_fork_whose_isolation_fails_says_so_and_never_loads_the_model(environment, tmp_path, settings):
    """Asked for more memory than its template may give (rlimits only go down), the fork must refuse
    to run, and say why on its answer pipe, even after it moved its descriptors."""
    from deployments.runtime import protocol

    build = tmp_path / "build"
    stand_in_build(build, SPY)

    async def scenario():
        template = await templates.shared.get(environment, 1)
        requests_in, requests_out = os.pipe()
        answers_in, answers_out = os.pipe()
        files = {name: os.open(build / name, os.O_RDONLY) for name in sorted(os.listdir(build))}
        log_fd = os.open(tmp_path / "fork.log", os.O_WRONLY | os.O_CREAT, 0o600)
        too_much = sandbox.Limits(memory_bytes=settings.SERVEML_MODEL_MEMORY_BYTES * 2, cpu_seconds=10)
        forked = await template.fork(
            uid=sandbox.uid_for(742),
            label="too much",
            limits=too_much,
            requests=requests_in,
            answers=answers_out,
            log_fd=log_fd,
            files=files,
        )
        for fd in (requests_in, answers_out, log_fd, *files.values()):
            os.close(fd)
        answer = await asyncio.to_thread(os.read, answers_in, 65536)
        rest = await asyncio.to_thread(os.read, answers_in, 65536)  # then the pipe ends: it exited
        forked.close()
        os.close(answers_in)
        os.close(requests_out)
        return protocol.decode_answer(answer), rest

    (status, body, _), rest = run(scenario)
    assert status == 503 and b"could not be isolated" in body and b"nothing of the model was loaded" in body
    assert rest == b""
