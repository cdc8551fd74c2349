"""The load: `wrk` sending a fixed number of requests per case, and what each case measured."""

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import BENCH, ROW
from bench.memory import PeakMemory


@dataclass
class Case:
    server: str
    model: str
    concurrency: int
    rows: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    peak_rss_mb: float = 0.0
    note: str = ""


@dataclass
class Results:
    cases: list[Case] = field(default_factory=list)
    floor_us: dict = field(default_factory=dict)  # model -> {"row": µs, "batch100_per_row": µs}
    transport_ms: dict = field(default_factory=dict)  # rows per request -> p50 of a constant answer
    hop_ms: dict = field(default_factory=dict)  # the same, answered through a child process (hop_floor.py)
    deploy: dict = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)  # "at rest" / "after the load tests" -> process -> RSS, private
    peers: dict = field(default_factory=dict)  # server (a peer's configuration) -> "ok: ..." or why it did not run
    metrics_cost: dict = field(default_factory=dict)  # the runtime at HEAD against the one before metrics
    aws_image: dict = field(default_factory=dict)  # the Lambda image's sizes and build times, or why skipped
    density: dict = field(default_factory=dict)  # many deployments: memory, cold starts, Zipf traffic (density.py)


@dataclass
class Setup:
    """What every section of the benchmark gets: the pickled models, their requirements.txt and
    how many requests each case sends."""

    models: dict  # "rf" / "lr" -> pickle path
    requirements: str
    counts: dict
    smoke: bool


def contract_bodies() -> dict:
    """ServeML's JSON contract: case name -> (concurrency, body, rows per request)."""
    single = json.dumps({"data": ROW}).encode()
    batch = json.dumps({"instances": [ROW] * 100}).encode()
    return {"c1": (1, single, 1), "c8": (8, single, 1), "c32": (32, single, 1), "batch": (1, batch, 100)}


def instances_bodies() -> dict:
    """Every request as a list of rows, one row included: what a batchable BentoML API takes."""
    single = json.dumps({"instances": [ROW]}).encode()
    batch = json.dumps({"instances": [ROW] * 100}).encode()
    return {"c1": (1, single, 1), "c8": (8, single, 1), "c32": (32, single, 1), "batch": (1, batch, 100)}


def v2_bodies() -> dict:
    """The same rows in the V2 inference protocol (MLServer)."""

    def body(rows):
        return json.dumps(
            {"inputs": [{"name": "input-0", "shape": [rows, 4], "datatype": "FP64", "data": ROW * rows}]}
        ).encode()

    single, batch = body(1), body(100)
    return {"c1": (1, single, 1), "c8": (8, single, 1), "c32": (32, single, 1), "batch": (1, batch, 100)}


def load(
    url: str, body: bytes, concurrency: int, requests: int, content_type="application/json", paths=None, zipf_s=1.1
) -> dict:
    """`wrk` sends `requests` POSTs over `concurrency` keep-alive connections, from its own process;
    with `paths` (URL paths under `url`, most popular first), each to one of them, Zipf-distributed
    with exponent `zipf_s` (fixed_requests.lua).

    One wrk thread: it is written in C and needs far less CPU than the servers it drives,
    which matters on two cores. Latencies come from its histogram, in microseconds.
    """
    requests = max(requests, concurrency)
    limit = max(60, requests // 50)  # seconds; only a server that drops connections gets near it
    with tempfile.TemporaryDirectory() as folder:
        body_file, paths_file = Path(folder) / "body", Path(folder) / "paths"
        body_file.write_bytes(body)
        extra = []
        if paths:
            paths_file.write_text("".join(f"{path}\n" for path in paths))
            extra = [paths_file, str(zipf_s)]
        done = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{limit}s", "--timeout", "10s", "-s", BENCH / "fixed_requests.lua"]
            + [url, "--", str(requests), body_file, content_type, *extra],
            capture_output=True,
            text=True,
            timeout=limit + 60,
        )
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    out = json.loads(line.removeprefix("RESULT "))
    return {
        "requests": out["requests"],
        "rps": out["requests"] / (out["duration_us"] / 1e6),
        "p50_ms": out["p50_us"] / 1000,
        "p99_ms": out["p99_us"] / 1000,
        # Requests that never completed (the run hit wrk's time limit) count as errors too.
        "errors": out["errors"] + max(0, requests - out["requests"]),
    }


def measure(
    results: Results,
    server: str,
    model: str,
    url: str,
    pid: int,
    bodies: dict,
    counts: dict,
    content_type="application/json",
):
    """Each case of `bodies` against `url`: a warm-up, then the counted run under PeakMemory(pid)."""
    for concurrency, body, rows in bodies.values():
        load(url, body, concurrency, counts["warmup"], content_type)
        with PeakMemory(pid) as memory:
            out = load(url, body, concurrency, counts["batch" if rows > 1 else f"c{concurrency}"], content_type)
        case = Case(
            server=server,
            model=model,
            concurrency=concurrency,
            rows=rows,
            requests=out["requests"],
            rps=out["rps"],
            p50_ms=out["p50_ms"],
            p99_ms=out["p99_ms"],
            errors=out["errors"],
            peak_rss_mb=memory.peak / 1024**2,
        )
        results.cases.append(case)
        print(
            f"  {server:8} {model:3} c{concurrency:<2} rows={rows:<3} {case.rps:8.0f} req/s "
            f"p50 {case.p50_ms:6.2f} ms p99 {case.p99_ms:6.2f} ms errors {case.errors}",
            flush=True,
        )
