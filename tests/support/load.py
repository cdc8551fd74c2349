"""Steady prediction load for the tests that break or switch things under it."""

import threading
import time

import httpx


class Stream:
    """Client threads posting the same body until stopped. Every answer is kept as
    (sent, answered, status code or exception name, its `predictions` or None)."""

    def __init__(self, url: str, body: dict, threads: int = 4, pause: float = 0.0):
        self.url, self.body, self.pause = url, body, pause
        self.answers: list[tuple[float, float, object, object]] = []
        self.running = True
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def loop(self):
        with httpx.Client(timeout=30) as client:  # a hang would show as a ReadTimeout
            while self.running:
                sent = time.monotonic()
                try:
                    response = client.post(self.url, json=self.body)
                    outcome, predictions = response.status_code, _predictions(response)
                except httpx.HTTPError as exc:
                    outcome, predictions = type(exc).__name__, None
                    time.sleep(0.05)  # the runtime is down: do not spin
                self.answers.append((sent, time.monotonic(), outcome, predictions))
                if self.pause:
                    time.sleep(self.pause)

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
        return [outcome for _, _, outcome, _ in self.answers if outcome != 200]

    def recovered_at(self, fault: float) -> float:
        """When the first request sent after the fault's last failure was answered 200: service is back."""
        last_failure = max((answered for _, answered, outcome, _ in self.answers if outcome != 200), default=fault)
        return min(answered for sent, answered, outcome, _ in self.answers if sent >= last_failure and outcome == 200)

    def slowest_after(self, moment: float, window: float = 5.0) -> float:
        """The longest wait of a request answered in the `window` seconds after `moment`."""
        return max(
            (answered - sent for sent, answered, _, _ in self.answers if moment <= answered <= moment + window),
            default=0.0,
        )

    def wait_for_answers(self, count: int, timeout: float = 60):
        deadline = time.monotonic() + timeout
        start = len(self.answers)
        while len(self.answers) < start + count:
            assert time.monotonic() < deadline, "the stream stopped getting answers"
            time.sleep(0.05)

    def wait_until(self, predictions: list, count: int = 30, timeout: float = 300) -> float:
        """Wait for `count` answers in a row with these predictions; when the first of them was sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.answers[-count:]
            if len(tail) == count and all(answer[3] == predictions for answer in tail):
                return tail[0][0]
            time.sleep(0.1)
        raise AssertionError(f"answers did not settle on {predictions}: last {self.answers[-3:]}")


def _predictions(response: httpx.Response):
    try:
        return response.json().get("predictions")
    except ValueError:
        return None
