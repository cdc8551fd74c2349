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
    r"batch100_per_row_vs_floor=\S+ warm_deploy_s=\S+ cold_deploy_s=\S+ cold_start_s=\S+$"
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
    assert set(results["transport_ms"]) == {"1", "100"} and all(v > 0 for v in results["transport_ms"].values())
    assert "| serveml | lr |" in report.split("## Batch of 100 rows, per row")[1]
