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
import time

import httpx
import pytest
from django.db import connection

from deployments.allowlist import corpus
from tests.support.load import Stream
from tests.test_end_to_end import ROWS, deploy, model_pid, token, wait_ready  # noqa: F401  (token: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


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
    assert all(outcome == 200 for _, _, outcome, _ in stream.answers[-50:])
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
    assert all(outcome == 200 for sent, _, outcome, _ in stream.answers if sent > recovered)
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
