"""The end-to-end tests' polling helper: it waits only for "not yet", never hides an answer."""

import sys
import time

import httpx
import pytest

from tests.conftest import wait_for
from tests.support.processes import NotReady, Service, free_port


def test_an_assertion_inside_a_check_fails_at_once_instead_of_as_a_timeout():
    def ready():
        raise AssertionError("the deployment failed: inspect refused the model")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the deployment failed: inspect refused the model"):
        wait_for(ready, 30, "deployment ready")
    assert time.monotonic() - started < 5


def test_an_unexpected_error_inside_a_check_is_raised_as_it_is():
    with pytest.raises(KeyError, match="endpoint_url"):
        wait_for(lambda: {}["endpoint_url"], 30, "endpoint")


def test_connection_errors_while_a_service_starts_are_tried_again_until_it_answers():
    attempts = []

    def check():
        attempts.append(1)
        if len(attempts) < 3:
            raise httpx.ConnectError("connection refused")
        return "up"

    assert wait_for(check, 30, "service start") == "up"
    assert len(attempts) == 3


def test_a_timeout_says_what_did_not_happen_and_the_last_error_seen(tmp_path):
    log = tmp_path / "service.log"
    log.write_text("listening on a port nobody asked for\n")

    def check():
        raise httpx.ConnectError("connection refused")

    with pytest.raises(AssertionError) as failed:
        wait_for(check, 0.5, "runtime start", log)
    message = str(failed.value)
    assert message.startswith(
        "runtime start did not happen within 0.5 s (last error: ConnectError: connection refused)"
    )
    assert "listening on a port nobody asked for" in message


def test_a_falsy_result_is_not_yet():
    results = iter([None, [], 0, "ready"])
    assert wait_for(lambda: next(results), 30, "ready") == "ready"


def test_a_service_that_exits_before_it_answers_fails_at_once_with_its_log(tmp_path):
    service = Service(
        "exits", [sys.executable, "-c", "print('bad config', flush=True); raise SystemExit(3)"], log_dir=tmp_path
    ).start()
    service.proc.wait(30)
    started = time.monotonic()
    with pytest.raises(NotReady, match=r"exits exited \(3\) before it answered"):
        service.wait_answers(f"http://127.0.0.1:{free_port()}/health", 30)
    assert time.monotonic() - started < 5
    assert service.output() == "bad config\n"
    service.stop()
