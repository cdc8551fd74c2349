"""Nothing gets stuck and nothing is lost: the claim, resume and reaper on their own, then
faults injected into the real processes (a private Redis, Celery worker, beat and runtime
that these tests kill, stop and start again).

A test-only hook (SERVEML_TEST_HOLD_DIR, see pipeline.runner._hold_for_tests) holds a
stage while a file exists, so that each kill lands inside the stage it means to.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone
from kombu.exceptions import OperationalError
from rest_framework.authtoken.models import Token

from deployments import sandbox, services, tasks
from deployments.allowlist import corpus
from deployments.models import Deployment
from deployments.pipeline import runner
from deployments.pipeline.errors import TransientStageError
from tests.conftest import OUTPUT, SKLEARN_PIN, Redis, Stack, dump, use_broker, wait_for
from tests.support.models import model_pids, pids_of_uid

LOCAL_STAGES = [stage.value for stage, _ in runner.PIPELINES["local"]]


# ------------------------------------------------------------------ claim, resume, reaper


@pytest.fixture
def sent(monkeypatch):
    """What the services send to the broker, recorded instead of sent (these tests have no broker)."""
    calls = []

    def send(deployment_id, task_name, *, quiet=False):
        calls.append((deployment_id, task_name))
        Deployment.objects.filter(pk=deployment_id).update(enqueued_at=timezone.now())
        return True

    monkeypatch.setattr(services, "_send", send)
    return calls


def claim(deployment, token):
    return services.deployment_claim(deployment_id=deployment.pk, token=token)


def expire_lease(deployment):
    """What a worker that died leaves: a lease nobody renews any more."""
    Deployment.objects.filter(pk=deployment.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def fake_pipeline(monkeypatch, ran, failures: dict):
    """Three recording stages; `failures` maps a stage to the exceptions it raises on its first runs."""

    def stage(name):
        def function(deployment):
            ran.append(name)
            if failures.get(name):
                raise failures[name].pop(0)
            return f"{name} done"

        return function

    monkeypatch.setitem(
        runner.PIPELINES, "local", [(name, stage(name)) for name in ("inspect", "environment", "validate")]
    )


class Killed(BaseException):
    """Stands for the worker dying mid-stage: nothing in the runner catches it."""


@pytest.mark.django_db(transaction=True)
def test_a_live_heartbeat_keeps_the_claim_for_longer_than_its_lease(user, make_deployment, sent, settings):
    settings.SERVEML_CLAIM_LEASE_S = 0.6
    deployment = make_deployment(user)
    assert claim(deployment, "live")
    with runner.Heartbeat(deployment.pk, "live", on_overrun=runner._fail_overrun) as heartbeat:
        heartbeat.stage_started("environment")
        time.sleep(2.0)  # more than three leases
        assert services.deployment_reap() == {"requeued": 0, "failed": 0, "resent": 0}
        assert claim(deployment, "another") is None
    deployment.refresh_from_db()
    assert deployment.claim_token == "live" and deployment.interruptions == 0
    time.sleep(1.0)  # with no heartbeat, the same claim lapses within one lease
    assert services.deployment_reap()["requeued"] == 1


def failed_while_hung(task, deployment_pk: int, release: threading.Event) -> Deployment:
    """Run `task(deployment_pk)` in another thread (a worker with its own database connection)
    while its work hangs until `release` is set; the deployment once its heartbeat failed it."""

    def target():
        try:
            task(deployment_pk)
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    try:
        return wait_for(
            lambda: Deployment.objects.filter(pk=deployment_pk, status="failed").first(), 15, "the hung work failed"
        )
    finally:
        release.set()
        thread.join(15)


@pytest.mark.django_db(transaction=True)
def test_a_stage_hung_past_its_timeout_fails_with_why_and_the_stuck_task_writes_nothing_later(
    user, make_deployment, sent, settings, monkeypatch
):
    settings.SERVEML_CLAIM_LEASE_S, settings.SERVEML_STAGE_TIMEOUT_S = 0.6, 1.5
    release = threading.Event()

    def environment(deployment):
        release.wait(30)  # hung on something with no timeout of its own
        return "environment done"

    monkeypatch.setitem(runner.PIPELINES, "local", [("inspect", lambda d: "inspected"), ("environment", environment)])
    deployment = make_deployment(user)
    failed = failed_while_hung(runner.run, deployment.pk, release)
    assert failed.stage == "environment" and failed.claim_token == "" and failed.completed_stages == ["inspect"]
    assert failed.error.startswith("The environment stage did not finish within 0.025 minutes")
    assert "Try again" in failed.error
    # Released, the stuck task found its claim gone and recorded nothing more.
    deployment.refresh_from_db()
    assert (deployment.status, deployment.completed_stages) == ("failed", ["inspect"])
    assert not deployment.events.filter(message="environment done").exists()
    assert services.deployment_reap() == {"requeued": 0, "failed": 0, "resent": 0}


@pytest.mark.django_db(transaction=True)
def test_a_teardown_hung_past_its_timeout_fails_and_can_be_stopped_again(
    user, make_deployment, sent, settings, monkeypatch
):
    settings.SERVEML_CLAIM_LEASE_S, settings.SERVEML_STAGE_TIMEOUT_S = 0.6, 1.5
    release = threading.Event()
    monkeypatch.setattr(services, "deployment_stop", lambda deployment: release.wait(30))
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status="stopping", target="aws")
    failed = failed_while_hung(runner.stop, deployment.pk, release)
    assert failed.stage == "teardown" and failed.claim_token == ""
    assert "The teardown stage did not finish within" in failed.error and failed.can_stop()


@pytest.mark.django_db
def test_an_expired_lease_lets_another_task_take_over_and_the_stale_task_can_write_nothing(user, make_deployment, sent):
    deployment = make_deployment(user)
    stale = claim(deployment, "stale")
    services.deployment_set_stage(deployment=stale, stage="validate", token="stale")
    assert claim(deployment, "early") is None  # its lease still runs
    expire_lease(deployment)

    fresh = claim(deployment, "fresh")
    assert fresh.status == "deploying" and fresh.claim_token == "fresh" and fresh.interruptions == 1
    assert "stopped during the validate stage" in fresh.events.get(level="warning").message
    assert not services.deployment_renew_claim(deployment_id=deployment.pk, token="stale")
    assert services.deployment_renew_claim(deployment_id=deployment.pk, token="fresh")
    for write in (
        lambda: services.deployment_set_stage(deployment=stale, stage="package", token="stale"),
        lambda: services.deployment_complete_stage(deployment=stale, stage="validate", token="stale", message="-"),
        lambda: services.deployment_mark_ready(deployment=stale, token="stale"),
        lambda: services.deployment_fail(deployment=stale, stage="validate", message="-", token="stale"),
        lambda: services.deployment_requeue(deployment=stale, reason="-", token="stale", retry_in=5),
    ):
        with pytest.raises(services.ClaimLost):
            write()
    fresh.refresh_from_db()
    assert (fresh.status, fresh.stage, fresh.completed_stages, fresh.claim_token) == (
        "deploying",
        "validate",
        [],
        "fresh",
    )


@pytest.mark.django_db
def test_a_task_that_takes_over_resumes_at_the_first_stage_not_completed(
    user, make_deployment, sent, monkeypatch, django_capture_on_commit_callbacks
):
    deployment = make_deployment(user)
    ran = []
    fake_pipeline(monkeypatch, ran, {"environment": [Killed()]})
    with pytest.raises(Killed):
        runner.run(deployment.pk)
    deployment.refresh_from_db()
    assert (deployment.status, deployment.completed_stages) == ("deploying", ["inspect"])
    # A task that stops without finishing lets its lease go at once: the next reaper run hands it on.
    with django_capture_on_commit_callbacks(execute=True):
        assert services.deployment_reap()["requeued"] == 1
    assert sent == [(deployment.pk, "deploy")]

    runner.run(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == "ready" and deployment.completed_stages == ["inspect", "environment", "validate"]
    assert ran == ["inspect", "environment", "environment", "validate"]
    timed = [e.stage for e in deployment.events.all() if e.duration_ms is not None]
    assert timed == ["inspect", "environment", "validate"]


@pytest.mark.django_db
def test_a_transient_error_hands_the_deployment_back_and_the_retry_resumes_at_that_stage(
    user, make_deployment, sent, monkeypatch
):
    deployment = make_deployment(user)
    ran = []
    fake_pipeline(monkeypatch, ran, {"validate": [TransientStageError("the index timed out")]})
    with pytest.raises(TransientStageError):
        runner.run(deployment.pk, retry_in=120)
    deployment.refresh_from_db()
    assert (deployment.status, deployment.claim_token, deployment.completed_stages) == (
        "queued",
        "",
        ["inspect", "environment"],
    )
    assert deployment.events.filter(level="warning", message="the index timed out — retrying").exists()
    # Its retry is due in two minutes: the reaper does not send a second one before.
    assert services.deployment_reap()["resent"] == 0

    runner.run(deployment.pk, retry_in=None)
    deployment.refresh_from_db()
    assert deployment.status == "ready" and ran == ["inspect", "environment", "validate", "validate"]


@pytest.mark.django_db
def test_the_last_try_of_a_transient_error_fails_the_deployment_with_its_message(
    user, make_deployment, sent, monkeypatch
):
    deployment = make_deployment(user)
    fake_pipeline(monkeypatch, [], {"environment": [TransientStageError("the index timed out")]})
    runner.run(deployment.pk, retry_in=None)
    deployment.refresh_from_db()
    assert (deployment.status, deployment.stage, deployment.error) == ("failed", "environment", "the index timed out")


@pytest.mark.django_db
def test_the_reaper_gives_up_on_a_deployment_whose_worker_stopped_too_many_times(
    user, make_deployment, sent, settings, django_capture_on_commit_callbacks
):
    settings.SERVEML_DEPLOY_MAX_ATTEMPTS = 3
    deployment = make_deployment(user)
    outcomes = []
    for attempt in range(3):
        services.deployment_set_stage(
            deployment=claim(deployment, f"worker-{attempt}"), stage="environment", token=f"worker-{attempt}"
        )
        expire_lease(deployment)
        with django_capture_on_commit_callbacks(execute=True):
            outcomes.append(services.deployment_reap())
    assert [o["requeued"] for o in outcomes] == [1, 1, 0] and outcomes[-1]["failed"] == 1
    assert sent == [(deployment.pk, "deploy")] * 2
    deployment.refresh_from_db()
    assert deployment.status == "failed" and deployment.is_terminal()
    assert deployment.error.startswith(
        "The worker running it stopped 3 times (the last time during the environment stage); ServeML gave up."
    )
    assert [e.message[:40] for e in deployment.events.filter(level="warning")] == [
        "the worker running it stopped during the",
        "the worker running it stopped during the",
    ]
    assert "attempt 2 of 3" in deployment.events.filter(level="warning").first().message


@pytest.mark.django_db
def test_the_reaper_sends_again_what_the_broker_never_took_or_may_have_lost(user, make_deployment, sent, settings):
    never_sent, just_sent, long_ago, running = (make_deployment(user, name=n) for n in ("a", "b", "c", "d"))
    now = timezone.now()
    Deployment.objects.update(updated_at=now - timedelta(seconds=30))
    Deployment.objects.filter(pk=just_sent.pk).update(enqueued_at=now - timedelta(seconds=5))
    Deployment.objects.filter(pk=long_ago.pk).update(
        enqueued_at=now - timedelta(seconds=settings.SERVEML_REQUEUE_QUEUED_AFTER_S + 1)
    )
    claim(running, "live")

    assert services.deployment_reap()["resent"] == 2
    assert sorted(sent) == sorted([(never_sent.pk, "deploy"), (long_ago.pk, "deploy")])
    assert never_sent.events.filter(message__startswith="the broker answers again").exists()
    assert services.deployment_reap()["resent"] == 0  # sent just now: not again at every run


@pytest.mark.django_db
def test_a_teardown_whose_worker_stopped_is_sent_again(user, make_deployment, sent, django_capture_on_commit_callbacks):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status="stopping", target="aws")
    assert services.deployment_claim_stop(deployment_id=deployment.pk, token="stopper")
    assert services.deployment_claim_stop(deployment_id=deployment.pk, token="duplicate") is None
    expire_lease(deployment)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.deployment_reap()["requeued"] == 1
    assert sent == [(deployment.pk, "stop")]
    deployment.refresh_from_db()
    assert (deployment.status, deployment.claim_token, deployment.interruptions) == ("stopping", "", 1)
    assert services.deployment_claim_stop(deployment_id=deployment.pk, token="next")


@pytest.mark.django_db(transaction=True)
def test_an_upload_while_the_broker_is_down_is_stored_and_says_it_will_start(user, make_deployment, monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.deploy, "delay", down)
    deployment = make_deployment(user)
    deployment.refresh_from_db()
    assert deployment.status == "queued" and deployment.enqueued_at is None
    assert deployment.events.get(level="warning").message.startswith("queued; will start when the broker is back")
    published = []
    monkeypatch.setattr(tasks.deploy, "delay", published.append)
    Deployment.objects.update(updated_at=timezone.now() - timedelta(seconds=30))
    services.deployment_reap()
    assert published == [deployment.pk]


# ------------------------------------------------------------------ faults in the real processes

LEASE_S = 3
FIGURES: dict[str, float] = {}
MODEL = dump(corpus.logistic_regression())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_an_install_dies_with_the_worker_process_that_started_it(tmp_path):
    """uv runs through environments.dies_with_parent: SIGKILL the process that started it
    (a Celery pool process) and the install is killed too, instead of writing on."""
    pidfile = tmp_path / "install.pid"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; from deployments.environments import dies_with_parent; "
            "subprocess.run(dies_with_parent(['sh', '-c', 'echo $$ > ' + sys.argv[1] + '; exec sleep 300']))",
            str(pidfile),
        ],
        cwd=django_settings.BASE_DIR,
    )
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the install started")
        install = int(pidfile.read_text())
        assert alive(install)
        starter.kill()
        starter.wait()
        wait_for(lambda: not alive(install), 10, "the install killed with the process that started it")
    finally:
        starter.kill()
        if pidfile.exists() and pidfile.read_text().strip() and alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


class Faults:
    """A stack of its own (Redis, worker, beat, runtime), with a short lease, for tests to break."""

    def __init__(self, hold_dir):
        self.hold_dir = hold_dir
        self.redis = Redis("faults-redis")
        self.stack = Stack(
            self.redis.url,
            name="faults",
            beat=True,
            extra_env={
                "SERVEML_CLAIM_LEASE_S": str(LEASE_S),
                "SERVEML_REAP_INTERVAL_S": "1",
                "SERVEML_REQUEUE_QUEUED_AFTER_S": "20",
                "SERVEML_DEPLOY_MAX_ATTEMPTS": "3",
                "SERVEML_TEST_HOLD_DIR": str(hold_dir),
            },
        )
        self.seen: set[str] = set()
        self.uids: set[int] = set()
        self.killed: list[int] = []

    @property
    def worker(self):
        return self.stack.worker

    def hold(self, point: str) -> None:
        (self.hold_dir / point).touch()

    def release(self, point: str) -> None:
        (self.hold_dir / point).unlink(missing_ok=True)

    @contextmanager
    def holding(self, *points: str) -> Iterator[None]:
        """Tasks hold at each of `points` until the block ends (or `release` lets one go sooner)."""
        for point in points:
            self.hold(point)
        try:
            yield
        finally:
            for point in points:
                self.release(point)

    @contextmanager
    def uploaded_and_held(self, live_server, token: str, point: str = "validate") -> Iterator[str]:
        """Upload a model and wait until its task holds at `point`; the deployment's public id.
        The task goes on when the block ends."""
        with self.holding(point):
            public_id = self.upload(live_server, token)
            self.held(point)
            yield public_id

    def held(self, point: str, timeout: float = 90) -> int:
        """Wait until a task holds at `point`; the pid of the (pool) process holding it."""
        marker = self.hold_dir / f"{point}.held"
        wait_for(marker.exists, timeout, f"a task holding at {point}", self.worker.log)
        pid = int(marker.read_text().split()[0])
        marker.unlink()
        return pid

    def restart_worker(self) -> None:
        self.worker.stop()  # whatever is left of it
        self.stack.start_worker()

    def upload(self, live_server, token: str) -> str:
        response = httpx.post(
            f"{live_server.url}/api/deploy",
            headers={"Authorization": f"Token {token}"},
            timeout=60,
            files={"model_file": ("model.pkl", MODEL), "requirements_file": ("requirements.txt", SKLEARN_PIN)},
        )
        assert response.status_code == 202, response.text
        self.seen.add(response.json()["id"])
        # Its uid, while the database still has its row: the teardown looks for any process left with it.
        self.uids.add(sandbox.uid_for(Deployment.objects.get(public_id=response.json()["id"]).pk))
        return response.json()["id"]


@pytest.fixture(scope="module")
def fault_stack(django_db_setup, django_db_blocker, tmp_path_factory):
    from serveml.celery import app

    previous = app.conf.broker_url, django_settings.SERVEML_RUNTIME_URL, django_settings.SERVEML_RUNTIME_INTERNAL_URL
    fixture = Faults(tmp_path_factory.mktemp("holds"))
    fixture.redis.start()
    try:
        fixture.stack.start()
        use_broker(fixture.redis.url)
        django_settings.SERVEML_RUNTIME_URL = django_settings.SERVEML_RUNTIME_INTERNAL_URL = fixture.stack.runtime_url
        yield fixture
    finally:
        groups = [
            service.proc.pid for service in (fixture.worker, fixture.stack.beat, fixture.stack.runtime) if service.proc
        ]
        fixture.stack.stop()
        fixture.redis.stop()
        use_broker(previous[0])
        django_settings.SERVEML_RUNTIME_URL, django_settings.SERVEML_RUNTIME_INTERNAL_URL = previous[1:]
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / "faults.json").write_text(json.dumps(FIGURES, indent=1))
    # Once the stack is stopped, nothing of it runs: no worker, beat or runtime process, no model process.
    leftovers = [
        pid
        for group in groups
        for pid in subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    ]
    assert leftovers == []
    assert [pid for uid in fixture.uids for pid in pids_of_uid(uid)] == []  # under this session or not
    assert not [pid for pid in fixture.killed if alive(pid)]


@pytest.fixture
def faults(fault_stack):
    """The module's stack, whole again even if the test before this one failed half-way."""
    for held in fault_stack.hold_dir.iterdir():
        held.unlink()
    if fault_stack.redis.proc.poll() is not None:
        fault_stack.redis.start()
    if fault_stack.worker.proc.poll() is not None:
        fault_stack.restart_worker()
    return fault_stack


@pytest.fixture
def token(user):
    return Token.objects.create(user=user).key


def settled(public_id: str, timeout: float = 120) -> Deployment:
    def check():
        deployment = Deployment.objects.get(public_id=public_id)
        return deployment if deployment.status in ("ready", "failed") else None

    return wait_for(check, timeout, f"deployment {public_id} ready or failed", None)


def assert_sound(faults: Faults, deployment: Deployment, *, status: str = "ready") -> None:
    """It ended as expected with a reason, nothing of it is lost, nothing it ran is left behind."""
    assert deployment.status == status, deployment.error
    assert deployment.claim_token == "" and deployment.lease_expires_at is None
    # Its files are all there, and the same.
    with open(deployment.model_file.path, "rb") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == deployment.model_sha256
    assert deployment.requirements_file.storage.exists(deployment.requirements_file.name)
    if status == "ready":
        # Every stage completed exactly once, in order: a resumed task ran only what was left.
        timed = [e.stage for e in deployment.events.all() if e.duration_ms is not None]
        assert timed == LOCAL_STAGES
        answer = httpx.post(deployment.endpoint_url, json=deployment.example_request, timeout=60)
        assert answer.status_code == 200 and answer.json() == deployment.example_response
        # A provision run twice warms one model process, not two.
        assert 1 <= len(model_pids(deployment.public_id)) <= max(1, (os.cpu_count() or 1) - 1)
    else:
        assert deployment.error
        wait_for(lambda: not model_pids(deployment.public_id), 15, "the failed deployment's model processes gone")
    # No half-built environment (staging folders are `.KEY.*`), no process that was killed lives on.
    assert [p.name for p in (django_settings.DATA_DIR / "envs").glob(".*")] == []
    assert not [pid for pid in faults.killed if alive(pid)]
    assert not list(faults.hold_dir.glob("*.held"))


def kill(faults: Faults, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    faults.killed.append(pid)


@pytest.mark.parametrize("stage", LOCAL_STAGES)
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_during_each_stage_loses_nothing_and_the_deployment_finishes(faults, live_server, token, stage):
    """Two kills in the same stage: its pool process before the stage's work, then, once the
    reaper has re-queued it, the whole worker (its main process) after the work but before
    the stage is recorded as done. A fresh worker then resumes there and finishes."""
    with faults.holding(stage, f"{stage}.done"):
        public_id = faults.upload(live_server, token)
        child = faults.held(stage)
        assert child != faults.worker.proc.pid and alive(faults.worker.proc.pid)
        kill(faults, child)  # the main process lives on and starts a fresh pool process
        faults.release(stage)
        killed = time.monotonic()

        faults.held(f"{stage}.done")  # re-queued by the reaper, resumed at this stage, and its work done
        FIGURES[f"{stage}: pool process SIGKILLed, until a fresh task resumed the stage"] = round(
            time.monotonic() - killed, 1
        )
        main = faults.worker.proc.pid
        faults.killed.extend(pid for pid in faults.worker.group() if pid != main)
        kill(faults, main)  # its pool processes die with it (Celery gives them PDEATHSIG)
        faults.worker.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not faults.worker.group(), 15, "the killed worker's pool processes gone")
    faults.restart_worker()
    deployment = settled(public_id)
    FIGURES[f"{stage}: worker SIGKILLed after the stage's work, until ready with a restarted worker"] = round(
        time.monotonic() - killed, 1
    )
    assert_sound(faults, deployment)
    assert deployment.interruptions == 2
    assert deployment.events.filter(level="warning", message__contains=f"stopped during the {stage} stage").count() == 2


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_asked_to_stop_mid_stage_finishes_the_deployment_first(faults, live_server, token):
    with faults.uploaded_and_held(live_server, token) as public_id:
        faults.worker.proc.send_signal(signal.SIGTERM)  # warm shutdown, as `docker stop` or honcho asks
        time.sleep(LEASE_S + 1)  # longer than a lease: the heartbeat keeps the claim while it waits
        assert faults.worker.proc.poll() is None and "Warm shutdown" in faults.worker.output()
        assert Deployment.objects.get(public_id=public_id).status == "deploying"
    released = time.monotonic()
    deployment = settled(public_id)
    FIGURES["worker SIGTERMed mid-stage (warm shutdown): ready after the stage resumed"] = round(
        time.monotonic() - released, 1
    )
    assert faults.worker.proc.wait(60) == 0
    assert_sound(faults, deployment)
    assert deployment.interruptions == 0
    faults.restart_worker()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_when_its_shutdown_grace_ends_hands_the_deployment_back(faults, live_server, token):
    with faults.uploaded_and_held(live_server, token) as public_id:
        faults.worker.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        faults.killed.extend(faults.worker.group())
        os.killpg(faults.worker.proc.pid, signal.SIGKILL)  # the grace period is over, as `docker stop` does
        faults.worker.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not faults.worker.group(), 15, "the killed worker's processes gone")
    faults.restart_worker()
    deployment = settled(public_id)
    FIGURES["worker SIGTERMed, then SIGKILLed at the end of its grace period, restarted"] = round(
        time.monotonic() - killed, 1
    )
    assert_sound(faults, deployment)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_deployment_whose_worker_dies_every_time_fails_and_says_so(faults, live_server, token):
    with faults.holding("validate"):
        public_id = faults.upload(live_server, token)
        for _ in range(3):
            kill(faults, faults.held("validate"))
    killed = time.monotonic()
    deployment = settled(public_id)
    FIGURES["a worker that dies at every attempt: failed after the 3rd"] = round(time.monotonic() - killed, 1)
    assert_sound(faults, deployment, status="failed")
    assert deployment.stage == "validate" and deployment.interruptions == 3
    assert deployment.error.startswith(
        "The worker running it stopped 3 times (the last time during the validate stage); ServeML gave up."
    )


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_redis_restarted_during_a_deploy_loses_nothing_and_the_worker_reconnects(faults, live_server, token):
    with faults.uploaded_and_held(live_server, token) as public_id:
        faults.redis.stop()  # no persistence: whatever the broker held is gone
    deployment = settled(public_id)  # the deploy under way needs the database, not the broker
    assert_sound(faults, deployment)
    faults.redis.start()
    back = time.monotonic()
    second = settled(faults.upload(live_server, token))
    FIGURES["Redis restarted (data lost): a new upload ready after Redis is back"] = round(time.monotonic() - back, 1)
    assert_sound(faults, second)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_an_upload_while_redis_is_down_is_accepted_and_deploys_once_it_is_back(faults, live_server, token):
    faults.redis.stop()
    try:
        public_id = faults.upload(live_server, token)
        deployment = Deployment.objects.get(public_id=public_id)
        assert deployment.status == "queued" and deployment.enqueued_at is None
        assert deployment.events.get(level="warning").message.startswith("queued; will start when the broker is back")
        time.sleep(2)
    finally:
        faults.redis.start()
    back = time.monotonic()
    deployment = settled(public_id)
    FIGURES["upload while Redis was down: ready after Redis is back"] = round(time.monotonic() - back, 1)
    assert_sound(faults, deployment)
    assert deployment.events.filter(message__startswith="the broker answers again").exists()
