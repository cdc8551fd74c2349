"""The end-to-end tests' polling helper: it waits only for "not yet", never hides an answer."""

import time

import httpx
import pytest

from tests.conftest import wait_for


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
