"""The sandbox, attacked from inside as a hostile model would, and checked from the host.

Each test starts real bubblewrap sandboxes with a real model environment's
interpreter and runs the attacker's code in them; the assertions look from the
host (its /proc, its files, its sockets) at what that code reached.
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from deployments import sandbox, services
from deployments.environments import ensure_environment
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError
from deployments.requirements import parse_requirements
from tests import payloads
from tests.conftest import SKLEARN_PIN, stand_in_build
from tests.support.models import host_processes

LIMITS = sandbox.Limits(memory_bytes=1024**3, cpu_seconds=20)


@pytest.fixture(scope="module")
def environment():
    return ensure_environment(parse_requirements(SKLEARN_PIN)).path


def run_code(environment, code: str, *, uid: int = 2_000_901, files=None, binds=None, wall_seconds=30):
    launched = sandbox.launch(
        uid=uid, environment=environment, args=["-c", code], limits=LIMITS, files=files, binds=binds
    )
    return sandbox.run(launched, wall_seconds=wall_seconds)


def start_code(environment, code: str, *, uid: int) -> subprocess.Popen:
    launched = sandbox.launch(uid=uid, environment=environment, args=["-c", code], limits=LIMITS)
    proc = subprocess.Popen(launched.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **launched.popen_kwargs())
    launched.started()
    return proc


def wait_for_process(marker: str, timeout: float = 20) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, info in host_processes().items():
            if marker in info["cmdline"] and "bwrap" not in info["cmdline"] and "prlimit" not in info["cmdline"]:
                return pid, info
        time.sleep(0.1)
    raise AssertionError(f"no process with {marker!r} appeared")


def stop(proc: subprocess.Popen) -> None:
    sandbox.kill_group(proc.pid)
    proc.communicate()


def test_a_sandboxed_process_runs_as_its_deployments_own_uid_never_root(environment):
    proc = start_code(environment, "import time; time.sleep(30)  # tenant-uid-check", uid=sandbox.uid_for(41))
    try:
        pid, info = wait_for_process("tenant-uid-check")
        assert info["uid"] == settings.SERVEML_SANDBOX_UID_BASE + 41 != 0
        status = Path(f"/proc/{pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        # Its own user, PID, network and mount namespaces: none of them the host's.
        for namespace in ("user", "pid", "net", "mnt", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}")
    finally:
        stop(proc)


def test_one_tenant_cannot_see_trace_or_write_into_another_tenants_process(environment, tmp_path):
    victim = start_code(
        environment,
        "import time; open('/tmp/secret', 'w').write('x'); time.sleep(60)  # victim",
        uid=sandbox.uid_for(1),
    )
    try:
        victim_pid, _ = wait_for_process("# victim")
        attack = f"""
import json, os
seen = []
for entry in os.listdir('/proc'):
    if entry.isdigit():
        try:
            seen.append(open(f'/proc/{{entry}}/cmdline', 'rb').read().decode(errors='replace'))
        except OSError:
            pass
results = {{"seen": seen}}
for path in ['/proc/{victim_pid}/mem', '/proc/{victim_pid}/root/tmp/secret', '/proc/{victim_pid}/environ']:
    try:
        open(path, 'r+b' if path.endswith('mem') else 'rb').read(1)
        results[path] = 'OPENED'
    except OSError as exc:
        results[path] = type(exc).__name__
try:
    os.kill({victim_pid}, 9)
    results['kill'] = 'SENT'
except OSError as exc:
    results['kill'] = type(exc).__name__
print(json.dumps(results))
"""
        result = run_code(environment, attack, uid=sandbox.uid_for(2))
        report = json.loads(result.stdout)
        assert not any("victim" in command for command in report["seen"]), report["seen"]
        assert all(value != "OPENED" for key, value in report.items() if key.startswith("/proc")), report
        assert report["kill"] != "SENT"
        assert victim.poll() is None  # still alive and untouched
    finally:
        stop(victim)


def test_a_model_sees_only_its_binds_not_the_data_folder_the_database_or_the_source(environment, tmp_path):
    secret = settings.DATA_DIR / "media" / "another-tenant-model.pkl"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"another tenant's model")
    targets = [
        str(secret),
        str(settings.DATA_DIR / "serveml.sqlite3"),
        str(settings.BASE_DIR / "serveml" / "settings.py"),
        "/etc/passwd",
        "/root",
        str(Path.home()),
    ]
    code = f"""
import json, os
found = {{}}
for path in {targets!r}:
    found[path] = os.path.exists(path)
found['/'] = sorted(os.listdir('/'))
print(json.dumps(found))
"""
    report = json.loads(run_code(environment, code).stdout)
    assert report.pop("/") == ["bin", "dev", "env", "etc", "lib", "lib64", "proc", "tmp", "usr", "work"]
    assert not any(report.values()), report


def test_a_model_cannot_reach_a_unix_socket_or_a_port_on_the_host(environment, tmp_path):
    path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    path.chmod(0o777)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    try:
        code = f"""
import socket
for family, address in [(socket.AF_UNIX, {str(path)!r}), (socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]})),
                        (socket.AF_UNIX, '\\0serveml-abstract')]:
    s = socket.socket(family)
    try:
        s.connect(address)
        print('CONNECTED', address)
    except OSError as exc:
        print('refused', type(exc).__name__)
"""
        out = run_code(environment, code).stdout.decode()
        assert "CONNECTED" not in out and out.count("refused") == 3
    finally:
        server.close()
        tcp.close()


def test_a_setsid_grandchild_is_gone_once_its_sandbox_is_stopped(environment):
    code = (
        "import subprocess, time\n"
        "subprocess.Popen(['/usr/bin/setsid', '/usr/bin/sleep', '1234.5'], start_new_session=True)\n"
        "time.sleep(60)"
    )
    proc = start_code(environment, code, uid=sandbox.uid_for(7))
    wait_for_process("sleep 1234.5")
    stop(proc)
    time.sleep(0.5)
    assert not [info for info in host_processes().values() if "sleep 1234.5" in info["cmdline"]]


def test_a_fork_bomb_and_a_disk_filler_hit_the_limits(environment):
    code = """
import os
forks = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            import time; time.sleep(5); os._exit(0)
        forks += 1
except OSError:
    pass
try:
    with open('/tmp/fill', 'wb') as f:
        for _ in range(200):
            f.write(b'x' * 1024 * 1024)
    written = 'ALL'
except OSError as exc:
    written = type(exc).__name__
print(forks, written)
"""
    result = run_code(environment, code)
    forks, written = result.stdout.decode().split()
    assert int(forks) < LIMITS.processes and written != "ALL"


def test_files_are_handed_in_read_only_and_uploads_stay_private(environment, tmp_path):
    private = tmp_path / "model.pkl"
    private.write_bytes(b"weights")
    private.chmod(0o600)
    code = """
import os
print(open('model.pkl', 'rb').read().decode())
try:
    open('model.pkl', 'ab').write(b'x'); print('WROTE')
except OSError as exc:
    print(type(exc).__name__)
"""
    out = run_code(environment, code, files={"model.pkl": private}).stdout.decode().split()
    assert out == ["weights", "OSError"] or out[0] == "weights" and "WROTE" not in out
    assert private.read_bytes() == b"weights"


def test_bound_files_must_be_world_readable_and_names_are_plain(environment, tmp_path):
    private = tmp_path / "model.pkl"
    private.write_bytes(b"x")
    private.chmod(0o600)
    with pytest.raises(ValueError, match="world-readable"):
        sandbox.launch(uid=2_000_902, environment=environment, args=[], limits=LIMITS, binds={"m.pkl": private})
    with pytest.raises(ValueError, match="plain names"):
        sandbox.launch(uid=2_000_902, environment=environment, args=[], limits=LIMITS, files={"../x": private})


def test_the_sandbox_scrubs_secrets_from_the_environment(environment, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("DATABASE_URL", "postgresql://secret@db/serveml")
    monkeypatch.setenv("DJANGO_SECRET_KEY", "django-secret-value")
    names = run_code(environment, "import os; print(sorted(os.environ))").stdout.decode()
    for secret in ("AWS_SECRET_ACCESS_KEY", "DATABASE_URL", "DJANGO_SECRET_KEY"):
        assert secret not in names
    assert "HOME" in names and "TMPDIR" in names


def test_the_sandbox_enforces_its_cpu_limit(environment):
    launched = sandbox.launch(
        uid=2_000_903,
        environment=environment,
        args=["-c", "while True: pass"],
        limits=sandbox.Limits(memory_bytes=1024**3, cpu_seconds=1),
    )
    result = sandbox.run(launched, wall_seconds=30)
    assert result.returncode != 0 and not result.timed_out


# ------------------------------------------------------------------ fail closed


@pytest.fixture
def no_bubblewrap(monkeypatch, tmp_path):
    """A PATH with the other tools but no bwrap, and the sandbox's memory of a working host forgotten."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("prlimit", "setpriv", "unshare", "true"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sandbox, "_verified", False)


@pytest.mark.django_db
def test_without_bubblewrap_validate_fails_with_what_to_install_and_loads_nothing(
    environment, no_bubblewrap, user, make_deployment, tmp_path
):
    canary = tmp_path / "canary"
    # As if an operator had allowed os.system: only the sandbox stands between it and the host.
    deployment = make_deployment(user, model_bytes=payloads.call("os", "system", f"touch {canary}"))
    services.deployment_update(
        deployment=deployment,
        allowed_globals=[["os", "system"]],
        environment_key=ensure_environment(parse_requirements(SKLEARN_PIN)).key,
    )
    with pytest.raises(StageError, match="bwrap not found. Install bubblewrap") as failed:
        stages.validate(deployment)
    assert "Models are never loaded without the sandbox" in str(failed.value)
    assert not canary.exists()


@pytest.mark.django_db
def test_a_new_environment_is_not_compiled_without_the_sandbox(no_bubblewrap, tmp_path, settings):
    from deployments.environments import EnvironmentBuildError

    settings.DATA_DIR = tmp_path / "data"
    with pytest.raises(EnvironmentBuildError, match="bwrap not found"):
        ensure_environment(parse_requirements("six==1.16.0\n"))
    assert not list((tmp_path / "data" / "envs").glob("*/bin/python"))


@pytest.mark.django_db
def test_with_the_sandbox_switched_off_every_page_and_the_admin_warn(client, admin_user, settings):
    settings.SERVEML_SANDBOX = "off"
    client.force_login(admin_user)
    for url in ("/", "/deployments/new", "/admin/", "/admin/deployments/deployment/"):
        page = client.get(url, follow=True).content.decode()
        assert "The sandbox is switched off" in page, url
    settings.SERVEML_SANDBOX = "on"
    assert "The sandbox is switched off" not in client.get("/", follow=True).content.decode()


@override_settings(SERVEML_SANDBOX="off")
def test_with_the_sandbox_switched_off_the_event_log_says_so(environment):
    launched = sandbox.launch(uid=2_000_904, environment=environment, args=["-c", "print('ran')"], limits=LIMITS)
    assert not launched.isolated and launched.argv[0] == "prlimit"
    assert sandbox.run(launched, wall_seconds=30).stdout.strip() == b"ran"
    assert sandbox.describe(LIMITS).startswith("SANDBOX OFF")


def test_a_typo_in_a_switch_is_an_error_not_off(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from serveml import settings as project_settings

    monkeypatch.setenv("SERVEML_SANDBOX", "of")
    with pytest.raises(ImproperlyConfigured, match="SERVEML_SANDBOX='of' must be one of: on, off"):
        project_settings.env_choice("SERVEML_SANDBOX", "on", ("on", "off"))
    monkeypatch.setenv("SERVEML_ALLOW_SIGNUP", "ture")
    with pytest.raises(ImproperlyConfigured, match="is not a boolean"):
        project_settings.env_bool("SERVEML_ALLOW_SIGNUP", True)


# ------------------------------------------------------------------ two tenants' real model processes

TENANT_HANDLER = """
import json, os, subprocess

def model():
    pass

def handle_many(bodies):
    return [handle(body) for body in bodies]

def handle(body):
    request = json.loads(body)
    if request["do"] == "pid":
        return 200, json.dumps({"pid": os.getpid()}).encode()
    if request["do"] == "grandchild":
        subprocess.Popen(["/usr/bin/setsid", "/usr/bin/sleep", request["marker"]], start_new_session=True)
        return 200, b"{}"
    report = {"processes": []}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                report["processes"].append(open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    for name, path, mode in [("mem", f"/proc/{request['victim_pid']}/mem", "r+b"),
                             ("victim folder", request["victim_folder"] + "/planted", "wb"),
                             ("own folder", "/work/planted", "wb")]:
        try:
            open(path, mode).write(b"x")
            report[name] = "WROTE"
        except OSError as exc:
            report[name] = type(exc).__name__
    return 200, json.dumps(report).encode()
"""


def tenant_pool(environment, tmp_path, number: int):
    from deployments.runtime.access import Access
    from deployments.runtime.pool import ModelPool
    from deployments.runtime.registry import Spec

    build = tmp_path / f"tenant-{number}"
    model = stand_in_build(build, TENANT_HANDLER)
    spec = Spec(f"0f0e0d0c-0000-4000-8000-00000000000{number}", environment, build, model, sandbox.uid_for(number))
    return ModelPool(spec, Access(), max_size=1)


def test_two_tenants_model_processes_cannot_reach_each_other(environment, tmp_path):
    import asyncio

    async def scenario():
        victim, attacker = tenant_pool(environment, tmp_path, 1), tenant_pool(environment, tmp_path, 2)
        try:
            _, answer = await victim.predict(b'{"do": "pid"}')
            inner_pid = json.loads(answer)["pid"]
            victim_host_pid = victim.processes[0].pid
            request = {"do": "attack", "victim_pid": victim_host_pid, "victim_folder": str(tmp_path / "tenant-1")}
            _, report = await attacker.predict(json.dumps(request).encode())
            # Both forked from one warm template (the default), each as its own deployment's uid.
            forks = [victim.processes[0], attacker.processes[0]]
            assert forks[0].template is not None and forks[0].template is forks[1].template
            seen = host_processes()
            assert [seen[fork.pid]["uid"] for fork in forks] == [sandbox.uid_for(1), sandbox.uid_for(2)]
            assert all("serveml_template.py" in seen[fork.pid]["cmdline"] for fork in forks)
            return inner_pid, victim_host_pid, json.loads(report)
        finally:
            victim.close()
            attacker.close()

    inner_pid, victim_host_pid, report = asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while host_processes().get(victim_host_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_processes().get(victim_host_pid) is None  # stopped with its pool
    assert not any("tenant-1" in command or "00000000001" in command for command in report["processes"])
    assert report["mem"] != "WROTE" and report["victim folder"] != "WROTE" and report["own folder"] != "WROTE"
    assert not (tmp_path / "tenant-1" / "planted").exists()
    assert inner_pid < 10  # its own PID namespace: pid numbers of its own


def test_a_setsid_grandchild_of_a_model_process_is_gone_once_the_deployment_stops(environment, tmp_path):
    import asyncio

    async def scenario():
        pool = tenant_pool(environment, tmp_path, 3)
        try:
            await pool.predict(b'{"do": "grandchild", "marker": "4321.5"}')
            wait_for_process("sleep 4321.5")
        finally:
            pool.close()

    asyncio.run(scenario())
    time.sleep(0.5)
    assert not [info for info in host_processes().values() if "sleep 4321.5" in info["cmdline"]]


@override_settings(SERVEML_SANDBOX="off")
def test_with_the_sandbox_switched_off_a_model_process_still_serves_and_leaves_no_folder(environment, tmp_path):
    import asyncio
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("serveml-unsandboxed-*"))

    async def scenario():
        pool = tenant_pool(environment, tmp_path, 4)
        try:
            return await pool.predict(b'{"do": "pid"}')
        finally:
            pool.close()

    status, _ = asyncio.run(scenario())
    assert status == 200
    assert set(Path(tempfile.gettempdir()).glob("serveml-unsandboxed-*")) == before
