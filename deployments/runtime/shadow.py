"""Shadow comparison: a candidate version also predicts a sample of its deployment's live requests.

While a deployment's owner has shadow on for a ready version that does not serve, every tenth
request answered 200 on its stable URL (`POST /predict/<id>`; a counter, like the canary's) is
sent to the candidate's pool too, after the live answer went out: the client never waits for
it. At most MAX_IN_FLIGHT copies run at a time; a sampled request beyond that is dropped and
counted, never queued. The candidate's answer is compared with the live one: they agree when
every prediction is equal, numbers within a relative difference of TOLERANCE (a class label is
equal or not; a regression value may differ in its last bits). The runtime keeps the counts and
the first few disagreements, per deployment and candidate, for `GET /_shadow/<id>` (the page's).
"""

import asyncio
import math

import orjson

SAMPLE_PERCENT = 10
MAX_IN_FLIGHT = 4
TOLERANCE = 1e-6
EXAMPLES = 5
INPUT_CHARS = 300  # of a disagreeing request's body, shown on the page


class Shadow:
    """A deployment's shadowed candidate and what the comparison found so far."""

    def __init__(self, version_id: str, sample_percent: int = SAMPLE_PERCENT, max_in_flight: int = MAX_IN_FLIGHT):
        self.version_id = version_id
        self.sample_percent, self.max_in_flight = sample_percent, max_in_flight
        self.count = self.in_flight = 0
        self.compared = self.agreed = self.dropped = 0
        self.examples: list[dict] = []
        self.tasks: set[asyncio.Task] = set()  # held, so that a running comparison is not collected

    def offer(self, pool, body: bytes, live: bytes) -> None:
        """A live request answered 200 (`live`): compare a sample of them, in the background."""
        i = self.count
        self.count = (i + 1) % 100
        if i * self.sample_percent % 100 >= self.sample_percent:
            return
        if pool is None or self.in_flight >= self.max_in_flight:
            self.dropped += 1  # busy, or its processes were stopped: the sweep loads them again
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self.compare(pool, body, live))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def compare(self, pool, body: bytes, live: bytes) -> None:
        try:
            status, answer = await pool.predict(body)
        except Exception as exc:  # noqa: BLE001  (ModelUnavailable, a closed pool: the candidate failed)
            status, answer = getattr(exc, "status", 502), orjson.dumps({"error": str(exc)})
        finally:
            self.in_flight -= 1
        serving = predictions(live)
        candidate = predictions(answer) if status == 200 else {"status": status, **_json(answer)}
        self.compared += 1
        if status == 200 and agree(serving, candidate):
            self.agreed += 1
        elif len(self.examples) < EXAMPLES:
            text = body[:INPUT_CHARS].decode("utf-8", "replace") + ("…" if len(body) > INPUT_CHARS else "")
            self.examples.append({"input": text, "serving": serving, "candidate": candidate})

    def report(self) -> dict:
        return {
            "version_id": self.version_id,
            "sample_percent": self.sample_percent,
            "compared": self.compared,
            "agreed": self.agreed,
            "dropped": self.dropped,
            "in_flight": self.in_flight,
            "examples": self.examples,
        }


def _json(answer: bytes) -> dict:
    try:
        found = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def predictions(answer: bytes):
    """What an answer predicted: `prediction` (one row) or `predictions` (several)."""
    found = _json(answer)
    return found.get("predictions", found.get("prediction"))


def agree(a, b, tolerance: float = TOLERANCE) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(agree(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # True is not the label 1
    if isinstance(a, int | float) and isinstance(b, int | float):
        if a == b:
            return True
        if not (math.isfinite(a) and math.isfinite(b)):
            return False
        return abs(a - b) <= tolerance * max(abs(a), abs(b))
    return a == b
