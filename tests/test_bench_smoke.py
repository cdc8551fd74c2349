"""A fast run of the benchmark, so that `make bench` cannot rot: every ServeML
figure is produced and the summary line has its exact form."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SUMMARY = re.compile(
    r"^summary: c1_p50_over_floor_ms=\S+ c8_ratio_vs_best_peer=\S+ c32_ratio_vs_best_peer=\S+ "
    r"batch100_per_row_vs_floor=\S+ warm_deploy_s=\S+ cold_deploy_s=\S+ cold_start_s=\S+ "
    r"metrics_cost_c8=\S+ metrics_cost_c32=\S+ density_mb_per_model=\S+ cold_start_ms=\S+ "
    r"c32_zipf100_p99_ms=\S+ batch100_vs_bound=\S+ batch100_vs_isolated_bound=\S+$"
)


def test_the_benchmark_runs_end_to_end_in_smoke_mode():
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert SUMMARY.match(last), last
    figures = dict(item.split("=") for item in last.removeprefix("summary: ").split())
    assert all(value != "nan" for value in figures.values()), figures
    report = (ROOT / "bench" / "results-smoke.md").read_text()
    assert "| serveml | lr | 1 | 1 |" in report and "| fastapi | lr | 32 | 1 |" in report
    import json

    results = json.loads((ROOT / "bench" / "out" / "results-smoke.json").read_text())
    assert {case["errors"] for case in results["cases"]} == {0}
    assert {case["server"] for case in results["cases"]} == {"serveml", "fastapi"}
    # wrk stopped after the number of requests the smoke run asks for (a few more may land at c8/c32).
    asked = {(1, 1): 50, (8, 1): 100, (32, 1): 100, (1, 100): 20}
    for case in results["cases"]:
        assert (
            asked[case["concurrency"], case["rows"]] <= case["requests"] < asked[case["concurrency"], case["rows"]] + 32
        )
    for floor in ("transport_ms", "hop_ms"):  # the transport floor, alone and through a child process
        assert set(results[floor]) == {"1", "100"} and all(v > 0 for v in results[floor].values()), floor
    assert "| serveml | lr |" in report.split("## Batch of 100 rows, per row")[1]

    # Metrics cost: both runtimes ran (each checked to be the code it claims by its /metrics), in turn.
    cost = results["metrics_cost"]
    assert [run["runtime"] for run in cost["runs"]] == ["head", "baseline"], cost
    assert all(cost[f"c{c}"] > 0 for c in (1, 8, 32))
    assert all(len(cost[f"c{c}_rounds"]) == 1 for c in (1, 8, 32))
    assert "HEAD / baseline requests/s, median of the rounds" in report.split("## Metrics cost")[1]

    # Many deployments: every one loaded and measured, forked processes a few MB each, no errors.
    density = results["density"]
    assert list(density["memory"]) == ["1", "10", "12"], density["memory"]
    assert [figures["deployments"] for figures in density["memory"].values()] == [1, 10, 12]
    assert 0 < density["memory"]["10"]["private_mb_per_deployment"] < 30, density["memory"]
    assert density["zipf"]["errors"] == 0 and density["zipf"]["requests"] >= 500
    assert len(density["cold_start_ms"]) == 5 and all(ms > 0 for ms in density["cold_start_ms"])
    assert "Each additional loaded deployment" in report.split("## Many deployments")[1]

    # The Lambda image: built cold then warm (its dependency layer from the cache), or skipped with the reason.
    image = results["aws_image"]
    section = report.split("## aws target: Lambda image")[1].split("##")[0]
    if "skipped" in image:
        assert image["skipped"] in section
    else:
        assert image["added_mb"] > 0 and image["lambda_environment_mb"] > 0, image
        assert image["cold_build_s"] > 0 and image["warm_build_s"] > 0
        assert image["warm_cached_steps"] >= 1, image
        assert "the Lambda image adds" in section


def test_the_best_peer_is_each_peers_best_configuration():
    """The summary's ratio and the "Peers at their best" table take each peer's best configuration at
    each concurrency; one that did not run through does not count."""
    from bench.load import Case, Results
    from bench.report import best_peer_rows, summary_line

    results = Results()
    results.peers = {"serveml": "ok", "mlserver": "ok: a", "mlserver-batching": "ok: b", "bentoml-batchable": "failed"}
    for server, c8, c32 in (
        ("serveml", 9000, 20000),
        ("mlserver", 1500, 1000),
        ("mlserver-batching", 1000, 2500),
        ("bentoml-batchable", 9000, 9000),  # failed part way: not counted
    ):
        for concurrency, rps in ((8, c8), (32, c32)):
            results.cases.append(Case(server=server, model="lr", concurrency=concurrency, rows=1, rps=rps))
    figures = dict(item.split("=") for item in summary_line(results).removeprefix("summary: ").split())
    assert figures["c8_ratio_vs_best_peer"] == "6.000" and figures["c32_ratio_vs_best_peer"] == "8.000"
    assert best_peer_rows(results) == ["| mlserver | lr | 1500 (mlserver) | 6.00 | 2500 (mlserver-batching) | 8.00 |"]


def test_each_peer_is_pinned_with_the_scikit_learn_that_pickles_the_models():
    """bench/locks/<peer>.txt is compiled from <peer>.in; the peers unpickle what this interpreter
    pickled, so each lock pins this interpreter's scikit-learn (the project's pin)."""
    import sklearn

    for peer in ("fastapi", "mlserver", "bentoml"):
        lock = (ROOT / "bench" / "locks" / f"{peer}.txt").read_text().splitlines()
        assert f"scikit-learn=={sklearn.__version__}" in lock, peer
        assert f"scikit-learn=={sklearn.__version__}" in (ROOT / "bench" / "locks" / f"{peer}.in").read_text()
