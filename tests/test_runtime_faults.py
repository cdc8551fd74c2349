"""The prediction path on a bad day, with the real runtime, worker, Redis and database.

A steady stream of predictions runs from client threads while a fault is injected:
a model process killed, the runtime itself killed and started again, every
database connection terminated. Each test counts every answer: none may hang,
failures are bounded to what the fault must cost, and service comes back by
itself. The figures (requests failed, seconds to recover) are printed for the
README's operations section.
"""

import os
import signal
import threading
import time

import httpx
import pytest
from django.db import connection

from deployments.allowlist import corpus
from tests.test_end_to_end import ROWS, deploy, model_pid, token, wait_ready  # noqa: F401  (token: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class Stream:
    """Client threads sending predictions until stopped; every answer is recorded with its time."""

    def __init__(self, url: str, body: dict, threads: int = 4):
        self.url, self.body = url, body
        self.answers: list[tuple[float, float, object]] = []  # (sent, answered, status code or exception name)
        self.running = True
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def loop(self):
        with httpx.Client(timeout=30) as client:  # a hang would show as a ReadTimeout
            while self.running:
                sent = time.monotonic()
                try:
                    outcome = client.post(self.url, json=self.body).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                    time.sleep(0.05)  # the runtime is down: do not spin
                self.answers.append((sent, time.monotonic(), outcome))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads), "a client is stuck: a request hangs"

    def failures(self) -> list:
        return [outcome for _, _, outcome in self.answers if outcome != 200]

    def recovered_at(self, fault: float) -> float:
        """When the first request sent after the fault's last failure was answered 200: service is back."""
        last_failure = max((answered for _, answered, outcome in self.answers if outcome != 200), default=fault)
        return min(answered for sent, answered, outcome in self.answers if sent >= last_failure and outcome == 200)

    def slowest_after(self, moment: float, window: float = 5.0) -> float:
        """The longest wait of a request answered in the `window` seconds after `moment`."""
        return max(
            (answered - sent for sent, answered, _ in self.answers if moment <= answered <= moment + window),
            default=0.0,
        )

    def wait_for_answers(self, count: int, timeout: float = 60):
        deadline = time.monotonic() + timeout
        start = len(self.answers)
        while len(self.answers) < start + count:
            assert time.monotonic() < deadline, "the stream stopped getting answers"
            time.sleep(0.05)


def test_a_model_process_killed_under_load_costs_at_most_the_requests_it_held(stack, live_server, token):
    model = corpus.random_forest()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    body = {"instances": ROWS.tolist()}
    with Stream(state["endpoint_url"], body) as stream:
        stream.wait_for_answers(50)
        killed_at = time.monotonic()
        os.kill(model_pid(state["id"]), signal.SIGKILL)
        stream.wait_for_answers(200)
    failed = stream.failures()
    # The requests it held go once more to a fresh process: a kill costs at most those (four
    # clients, so at most four in flight), never a hang.
    assert len(failed) <= 4 and set(failed) <= {502}, failed
    assert all(outcome == 200 for _, _, outcome in stream.answers[-50:])
    print(
        f"\nmodel process killed under load: {len(failed)} of {len(stream.answers)} requests failed; "
        f"the slowest answer in the 5 s after the kill took {stream.slowest_after(killed_at):.2f} s"
    )


def test_the_runtime_killed_under_load_serves_again_within_seconds(stack, live_server, token):
    model = corpus.logistic_regression()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    with Stream(state["endpoint_url"], {"data": ROWS[0].tolist()}) as stream:
        stream.wait_for_answers(50)
        killed_at = time.monotonic()
        old_model = model_pid(state["id"])
        os.killpg(stack.runtime.proc.pid, signal.SIGKILL)
        stack.runtime.proc.wait()
        # Its model processes die with it (bubblewrap's --die-with-parent): no orphans serve on.
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{old_model}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{old_model}")
        stack.start_runtime()
        started_at = time.monotonic()
        stream.wait_for_answers(200)
    recovered = stream.recovered_at(killed_at)
    assert all(outcome == 200 for sent, _, outcome in stream.answers if sent > recovered)
    assert recovered - started_at < 10  # the ready deployment is loaded again on its first request
    failed = stream.failures()
    assert set(failed) <= {"ConnectError", "RemoteProtocolError", "ReadError", 502, 503}, set(failed)
    print(
        f"\nruntime killed under load: {len(failed)} requests failed while it was down; serving again "
        f"{recovered - killed_at:.2f} s after the kill ({recovered - started_at:.2f} s after it started)"
    )


@pytest.mark.skipif(connection.vendor != "postgresql", reason="terminates PostgreSQL backends")
def test_database_connections_terminated_under_load_break_no_prediction_and_everyone_reconnects(
    stack, live_server, token
):
    model = corpus.random_forest()
    state = wait_ready(stack, token, deploy(live_server, token, model))
    with Stream(state["endpoint_url"], {"instances": ROWS.tolist()}) as stream:
        stream.wait_for_answers(50)
        terminated = 0
        # For six seconds, every connection of every process (the runtime's sweep reads the
        # database every two seconds; the web and worker keep theirs) is cut as soon as it opens.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                terminated += cursor.fetchone()[0]
            time.sleep(0.2)
        stream.wait_for_answers(50)
    assert stream.failures() == []
    # The worker and the web process reconnect by themselves: a new deployment goes through.
    again = wait_ready(stack, token, deploy(live_server, token, corpus.logistic_regression()))
    assert httpx.post(again["endpoint_url"], json={"data": ROWS[0].tolist()}).status_code == 200
    print(
        f"\n{terminated} database connections terminated under load: 0 of {len(stream.answers)} predictions "
        "failed; the next deployment went through"
    )
