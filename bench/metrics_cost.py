"""What counting costs the prediction path (issue 12: within 5% with metrics on).

The runtime as it is (HEAD, or the working tree when it has changes) against the runtime of
BASELINE, the last commit before the runtime counted requests, checked out with `git worktree`
and run by the same interpreter, against the same database, deployment, environment and model.
Only one runtime runs at a time; their runs alternate A B B A ... so that drift in the machine's
load falls on both alike, and the figure is the median of the rounds' ratios.
"""

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench import LOGS, OUT, PYTHON, ROOT, ROW
from bench.load import Results, Setup, contract_bodies, load
from bench.serveml import deploy, serveml_stack
from tests.support.processes import NotReady, Service, free_port

# 231e870 added per-request counting (runtime/metrics.py); this is its parent. The runtime has
# read the same database columns, environments and build folders since (later migrations only add
# columns), so it serves today's deployments as they are. Between the two also landed canary and
# shadow routing (per-request checks) and model processes forked from warm templates: they are
# part of what is measured here, beside the counting; the runtime runs with its default settings.
BASELINE = "bb0f109"
CONCURRENCIES = (1, 8, 32)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def start_runtime(name: str, source: Path, env: dict) -> tuple[Service, str]:
    """The runtime of `source` (the checkout or the baseline's worktree), answering on a free port."""
    for attempt in range(3):
        port = free_port()
        # cwd=source puts that checkout first on sys.path: its `deployments` package is the one imported.
        server = Service(
            f"runtime-{name}", [PYTHON, "manage.py", "runtime", "--port", port], env=env, cwd=source, log_dir=LOGS
        ).start()
        try:
            server.wait_answers(f"http://127.0.0.1:{port}/health", 60)
            return server, f"http://127.0.0.1:{port}"
        except NotReady:
            server.stop()
            # Another process on this shared machine may take the port between free_port() and the
            # bind ("address already in use"): another port, twice; anything else fails the same way.
            if attempt == 2 or "address already in use" not in server.output():
                raise
    raise AssertionError("unreachable")


def counts_requests(base: str, token: str) -> bool:
    """Whether this runtime serves /metrics: the check that each side is the code it claims to be."""
    return httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def measure_once(name: str, source: Path, env: dict, path: str, counts: dict) -> dict:
    """Start this runtime, warm the deployment up, load it at each concurrency, stop it."""
    server, base = start_runtime(name, source, env)
    try:
        if counts_requests(base, env["SERVEML_RUNTIME_TOKEN"]) != (name == "head"):
            raise RuntimeError(f"the {name} runtime {'lacks' if name == 'head' else 'has'} /metrics: wrong code")
        url = base + path
        httpx.post(url, json={"data": ROW}, timeout=60).raise_for_status()  # the model process starts
        bodies = contract_bodies()
        figures = {}
        for concurrency in CONCURRENCIES:
            body = bodies[f"c{concurrency}"][1]
            load(url, body, concurrency, counts["warmup"])
            out = load(url, body, concurrency, counts["ab_requests"] // (4 if concurrency == 1 else 1))
            if out["errors"]:
                raise RuntimeError(f"{out['errors']} errors from the {name} runtime at concurrency {concurrency}")
            figures[f"c{concurrency}_rps"] = out["rps"]
            figures[f"c{concurrency}_p50_ms"] = out["p50_ms"]
        return figures
    finally:
        server.stop()


def run_metrics_cost(results: Results, setup: Setup):
    counts = setup.counts
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "deployments", "serveml"))
    results.metrics_cost = {
        "baseline": git("rev-parse", "--short", BASELINE),
        "head": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""),
        "runs": [],
    }
    worktree = Path(tempfile.mkdtemp(prefix="serveml-baseline-"))
    data_dir = Path(tempfile.mkdtemp(prefix="serveml-bench-metrics-", dir=OUT))
    try:
        git("worktree", "add", "--detach", "--force", str(worktree), BASELINE)
        with serveml_stack(data_dir) as stack:
            deployed, _ = deploy(stack, setup.models["lr"], setup.requirements)
            stack["runtime"].stop()  # from here on only the runtime being measured runs
            path = urlsplit(deployed["endpoint_url"]).path
            env = {**os.environ, **stack["env"]}
            sources = {"head": ROOT, "baseline": worktree}
            for round_ in range(counts["ab_rounds"]):
                # A B, then B A: neither side always runs first, on a cooler or warmer machine.
                for name in ("head", "baseline") if round_ % 2 == 0 else ("baseline", "head"):
                    started = time.monotonic()
                    figures = measure_once(name, sources[name], env, path, counts)
                    results.metrics_cost["runs"].append({"runtime": name, "round": round_ + 1, **figures})
                    print(
                        f"  round {round_ + 1} {name:8} "
                        + " ".join(f"c{c} {figures[f'c{c}_rps']:7.0f} req/s" for c in CONCURRENCIES)
                        + f" c1 p50 {figures['c1_p50_ms']:.3f} ms ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
        runs = results.metrics_cost["runs"]
        for concurrency in CONCURRENCIES:
            # A ratio per round, from its two adjacent runs, then their median: drift in the machine's
            # load between rounds cancels out, which a ratio of the two sides' medians would not do.
            key = f"c{concurrency}_rps"
            ratios = [
                head[key] / baseline[key]
                for head, baseline in zip(
                    [r for r in runs if r["runtime"] == "head"],
                    [r for r in runs if r["runtime"] == "baseline"],
                    strict=True,
                )
            ]
            results.metrics_cost[f"c{concurrency}"] = statistics.median(ratios)
            results.metrics_cost[f"c{concurrency}_rounds"] = ratios
        print(
            "  HEAD / baseline requests/s, median of the rounds: "
            + " ".join(f"c{c} {results.metrics_cost[f'c{c}']:.3f}" for c in CONCURRENCIES),
            flush=True,
        )
    except (RuntimeError, subprocess.CalledProcessError, AssertionError) as exc:
        # NotReady is an AssertionError: a runtime that never answered.
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        results.metrics_cost["failed"] = detail.strip().splitlines()[0] if detail.strip() else repr(exc)
        print(f"  failed: {results.metrics_cost['failed']}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
