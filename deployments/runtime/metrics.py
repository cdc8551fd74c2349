"""Live figures of the runtime, per deployment and version: answers by status class, a
latency histogram, requests in flight, the last request, rows predicted, batch sizes, model
processes (how many, how often started, their memory) and each version's share of the traffic.

The prediction path only touches a version's `Stats`, held by its pool: `record` is a few
integer increments and one bucket found by bisect, with no lock (one event loop) and no
label lookup; an answered (2xx) request adds its rows to `rows`, one integer add (the rows
were counted by len() where the body was parsed anyway, asgi.check_body; V2's by its batch
dimension). Everything else reads those counters when asked: `GET /metrics` (Prometheus
text, through a custom collector) and `GET /_figures[/<id>]` (the deployment page's figures
over the last minute and the last hour, from copies of the counters the sweep keeps). Both
need the runtime token: they name every deployment on the host.
A version's counters outlive its model processes (scale to zero, drain); they are dropped
when its deployment is stopped.
"""

import asyncio
import hmac
import time
from bisect import bisect_left
from collections import deque

import orjson
from asgiref.sync import sync_to_async
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from deployments.runtime import memory as process_memory
from deployments.runtime.asgi import error, respond
from deployments.runtime.registry import Spec, version_labels

# Upper bounds of the latency buckets, in seconds (Prometheus' `le`): a warm model answers in
# about a millisecond, the predict timeout is 30 s by default.
BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Requests per frame a model process is given (ModelPool.MAX_BATCH is 64): how much batching helps.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64)
CLASSES = ((2, "2xx"), (4, "4xx"), (5, "5xx"))  # status // 100: what is counted by name
SAMPLE_SECONDS = 10.0  # how often the sweep keeps a copy of the counters (the page's "last minute")
HISTORY = 361  # an hour of copies: the page's last-hour chart
WINDOW = 60.0


class Stats:
    """One version's counters. Only `record` and `in_flight` are touched per request."""

    __slots__ = (
        "deployment",
        "version",
        "statuses",
        "buckets",
        "seconds",
        "in_flight",
        "last",
        "rows",
        "starts",
        "batches",
        "batched_requests",
        "history",
    )

    def __init__(self, deployment: str, version: int = 1):
        self.deployment = deployment  # the stable URL's id (the root deployment's)
        self.version = version
        self.statuses = [0] * 6  # by status // 100
        self.buckets = [0] * (len(BOUNDS) + 1)  # the last one: slower than every bound
        self.seconds = 0.0
        self.in_flight = 0
        self.last = 0.0  # perf_counter() of the last answer; 0: none yet
        self.rows = 0  # rows predicted: those of answered (2xx) requests, added by the prediction paths
        self.starts = 0  # model processes started (cold starts: the first, after scale to zero, after a crash)
        self.batches = [0] * (len(BATCH_BOUNDS) + 1)  # frames sent to model processes, by requests in them
        self.batched_requests = 0  # requests in those frames (a retried request counts again)
        self.history = deque([(time.perf_counter(), tuple(self.statuses), tuple(self.buckets), 0)], maxlen=HISTORY)

    def record(self, status: int, started: float) -> None:
        now = time.perf_counter()
        elapsed = now - started
        self.statuses[status // 100] += 1
        self.buckets[bisect_left(BOUNDS, elapsed)] += 1
        self.seconds += elapsed
        self.last = now

    def batched(self, size: int) -> None:
        """A frame of `size` requests went to a model process (once per frame, not per request)."""
        self.batches[bisect_left(BATCH_BOUNDS, size)] += 1
        self.batched_requests += size

    @property
    def requests(self) -> int:
        return sum(self.buckets)

    def sample(self, now: float) -> None:
        if now - self.history[-1][0] >= SAMPLE_SECONDS:
            self.history.append((now, tuple(self.statuses), tuple(self.buckets), self.rows))

    def window(self, now: float) -> tuple[list[int], list[int], int]:
        """Answers by status // 100, by latency bucket, and rows predicted since about WINDOW
        seconds ago (since these counters started, when that is more recent)."""
        base = self.history[0]
        for sample in reversed(self.history):
            if now - sample[0] >= WINDOW:
                base = sample
                break
        return (
            [now_ - then for now_, then in zip(self.statuses, base[1], strict=True)],
            [now_ - then for now_, then in zip(self.buckets, base[2], strict=True)],
            self.rows - base[3],
        )


def quantile(q: float, buckets: list[int]) -> float | None:
    """The q-quantile of a histogram, interpolated within its bucket as Prometheus'
    histogram_quantile does; None when it is empty."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == len(BOUNDS):
                return BOUNDS[-1]  # slower than the last bound: that bound is all we know
            lower = BOUNDS[index - 1] if index else 0.0
            return lower + (BOUNDS[index] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


def last_hour(versions: list[Stats], now: float, minutes: int = 60) -> list[dict]:
    """Minute by minute over the last hour, oldest first, a deployment's versions together:
    requests per second, errors (4xx and 5xx) and p99, from the copies the sweep keeps."""
    statuses = [[0] * 6 for _ in range(minutes)]
    buckets = [[0] * (len(BOUNDS) + 1) for _ in range(minutes)]
    for stats in versions:
        points = [*stats.history, (now, tuple(stats.statuses), tuple(stats.buckets), stats.rows)]
        for (_, statuses0, buckets0, _), (then, statuses1, buckets1, _) in zip(points, points[1:], strict=False):
            age = int((now - then) // WINDOW)  # each step counts in the minute it ended in
            if age >= minutes:
                continue
            minute = minutes - 1 - age
            for total, before, after in ((statuses, statuses0, statuses1), (buckets, buckets0, buckets1)):
                row = total[minute]
                for index, (a, b) in enumerate(zip(before, after, strict=True)):
                    row[index] += b - a
    return [
        {
            "requests_per_second": sum(counts) / WINDOW,
            "errors": answers[4] + answers[5],
            "p99_seconds": quantile(0.99, counts),
        }
        for answers, counts in zip(statuses, buckets, strict=True)
    ]


def summary(statuses: list[int], buckets: list[int], rows: int) -> dict:
    requests = sum(buckets)
    errors = statuses[4] + statuses[5]
    return {
        "requests_per_minute": requests,
        "rows_per_minute": rows,
        "errors_4xx": statuses[4],
        "errors_5xx": statuses[5],
        "error_rate": errors / requests if requests else None,
        "p50_seconds": quantile(0.5, buckets),
        "p95_seconds": quantile(0.95, buckets),
        "p99_seconds": quantile(0.99, buckets),
    }


class Metrics:
    """The counters of every version the runtime has served, and how they are read."""

    def __init__(self, runtime):
        self.runtime = runtime  # its pools (model processes) and routes (which version serves)
        self.stats: dict[str, Stats] = {}  # by the version's own id (the pool's)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self))

    async def track(self, spec: Spec) -> Stats:
        """The counters of the version `spec` names, labelled once with its deployment and number."""
        stats = self.stats.get(spec.deployment_id)
        if stats is None:
            labels = await sync_to_async(version_labels)(spec.deployment_id)
            stats = self.stats.setdefault(spec.deployment_id, Stats(*(labels or (spec.deployment_id, 1))))
        return stats

    def refused(self, deployment_id: str, status: int, started: float) -> None:
        """A request the runtime refused before it reached a pool (a private one without a key)."""
        pool = self.runtime.pools.get(self.runtime.routes.get(deployment_id, deployment_id))
        if pool is not None:
            pool.stats.record(status, started)

    def forget(self, deployment_id: str) -> None:
        """A stopped deployment's counters, and its versions'."""
        for version_id in [key for key, stats in self.stats.items() if deployment_id in (key, stats.deployment)]:
            del self.stats[version_id]

    def sample(self) -> None:
        now = time.perf_counter()
        for stats in list(self.stats.values()):
            stats.sample(now)

    def processes(self, version_id: str) -> int:
        pool = self.runtime.pools.get(version_id)
        return len(pool.processes) if pool is not None else 0

    def memory(self) -> dict[str, int]:
        """Each version's model processes and all they started, in bytes of PSS: a process forked
        from a template shares most of its pages with it, which resident sizes would count again
        for every process (runtime/memory.py). Read from /proc when scraped, off the event loop."""
        pools = dict(self.runtime.pools)
        if not any(pool.processes for pool in pools.values()):
            return {}
        return process_memory.usage(pools, [])[1]

    def serving(self, deployment_id: str) -> str:
        return self.runtime.routes.get(deployment_id, deployment_id)

    def share(self, deployment_id: str, version_id: str) -> int:
        """The percent of the stable URL's requests this version is sent: the serving one's, less a canary's."""
        canary = self.runtime.canaries.get(deployment_id)
        if canary is not None and canary.version_id == version_id:
            return canary.percent
        if self.serving(deployment_id) != version_id:
            return 0
        return 100 - canary.percent if canary is not None else 100

    def figures(self, deployment_id: str | None = None) -> dict:
        """For each deployment (or just `deployment_id`): its figures over the last minute, in
        total and for each version, as the web page shows them."""
        now, wall = time.perf_counter(), time.time()
        found: dict[str, dict] = {}
        for version_id, stats in list(self.stats.items()):
            if deployment_id is not None and stats.deployment != deployment_id:
                continue
            statuses, buckets, rows = stats.window(now)
            figures = summary(statuses, buckets, rows) | {
                "requests": stats.requests,
                "rows": stats.rows,
                "in_flight": stats.in_flight,
                "processes": self.processes(version_id),
                "last_request": wall - (now - stats.last) if stats.last else None,
                "serving": self.serving(stats.deployment) == version_id,
                "traffic_percent": self.share(stats.deployment, version_id),
            }
            entry = found.setdefault(stats.deployment, {"versions": {}, "window": ([0] * 6, [0] * len(buckets), [0])})
            entry["versions"][str(stats.version)] = figures
            for total, part in zip(entry["window"], (statuses, buckets, [rows]), strict=True):
                total[:] = [a + b for a, b in zip(total, part, strict=True)]
        for deployment, entry in found.items():
            entry["last_hour"] = last_hour([s for s in list(self.stats.values()) if s.deployment == deployment], now)
            versions = entry["versions"].values()
            last = [v["last_request"] for v in versions if v["last_request"]]
            statuses, buckets, [rows] = entry.pop("window")
            entry["total"] = summary(statuses, buckets, rows) | {
                "requests": sum(v["requests"] for v in versions),
                "rows": sum(v["rows"] for v in versions),
                "in_flight": sum(v["in_flight"] for v in versions),
                "processes": sum(v["processes"] for v in versions),
                "last_request": max(last) if last else None,
            }
        return found

    async def serve(self, scope, send) -> None:
        """`GET /metrics` (Prometheus text) and `GET /_figures[/<id>]` (JSON), with the runtime token."""
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, b"Bearer " + self.runtime.token):
            return await respond(send, 403, error("bad runtime token"))
        if scope["method"] != "GET":
            return await respond(send, 405, error("use GET"))
        parts = scope["path"].strip("/").split("/")
        if parts == ["metrics"]:
            text = await asyncio.to_thread(generate_latest, self.registry)  # reads every model process's smaps
            return await respond(send, 200, text, {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
        if parts[0] == "_figures" and len(parts) <= 2:
            figures = self.figures(parts[1].lower() if len(parts) == 2 else None)
            return await respond(send, 200, orjson.dumps(figures))
        return await respond(send, 404, error("no such metrics"))


async def counted(stats: Stats, started: float, answering):
    """Await `answering` (a coroutine giving (status, ...)), counted in `stats`; an exception
    with a `status` (V2Error, ModelUnavailable) counts as that status."""
    stats.in_flight += 1
    try:
        answer = await answering
    except Exception as exc:
        stats.record(getattr(exc, "status", 500), started)
        raise
    finally:
        stats.in_flight -= 1
    stats.record(answer[0], started)
    return answer


class Collector:
    """Prometheus' view of the counters, built when scraped (no per-request label lookup)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        labels = ["deployment", "version"]
        requests = CounterMetricFamily(
            "serveml_requests", "Prediction requests answered, by status class", labels=[*labels, "code"]
        )
        latency = HistogramMetricFamily(
            "serveml_request_duration_seconds", "Time from request to answer", labels=labels
        )
        rows = CounterMetricFamily(
            "serveml_rows", "Rows predicted: those of the prediction requests answered (2xx)", labels=labels
        )
        batch = HistogramMetricFamily(
            "serveml_batch_size", "Requests in each frame sent to a model process", labels=labels
        )
        in_flight = GaugeMetricFamily("serveml_requests_in_flight", "Requests being answered", labels=labels)
        processes = GaugeMetricFamily("serveml_model_processes", "Model processes running", labels=labels)
        starts = CounterMetricFamily(
            "serveml_model_process_starts", "Model processes started (cold starts, restarts)", labels=labels
        )
        memory = GaugeMetricFamily(
            "serveml_model_memory_bytes", "Memory of the model processes running (PSS)", labels=labels
        )
        serving = GaugeMetricFamily(
            "serveml_version_serving", "1 for the version the stable URL answers with", labels=labels
        )
        share = GaugeMetricFamily(
            "serveml_version_traffic_percent",
            "The share of the stable URL's requests sent to this version (the serving one, a canary)",
            labels=labels,
        )
        last = GaugeMetricFamily(
            "serveml_last_request_timestamp_seconds", "When the last request was answered (Unix time)", labels=labels
        )
        now, wall = time.perf_counter(), time.time()
        resident = self.metrics.memory()
        for version_id, stats in list(self.metrics.stats.items()):
            values = [stats.deployment, str(stats.version)]
            for index, name in CLASSES:
                requests.add_metric([*values, name], stats.statuses[index])
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BOUNDS), "+Inf"), stats.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(values, buckets, stats.seconds)
            rows.add_metric(values, stats.rows)
            sizes, cumulative = [], 0
            for bound, count in zip((*map(str, BATCH_BOUNDS), "+Inf"), stats.batches, strict=True):
                cumulative += count
                sizes.append((bound, cumulative))
            batch.add_metric(values, sizes, stats.batched_requests)
            in_flight.add_metric(values, stats.in_flight)
            processes.add_metric(values, self.metrics.processes(version_id))
            starts.add_metric(values, stats.starts)
            memory.add_metric(values, resident.get(version_id, 0))
            serving.add_metric(values, int(self.metrics.serving(stats.deployment) == version_id))
            share.add_metric(values, self.metrics.share(stats.deployment, version_id))
            if stats.last:
                last.add_metric(values, wall - (now - stats.last))
        yield from (requests, latency, rows, batch, in_flight, processes, starts, memory, serving, share, last)
