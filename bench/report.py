"""The report: the summary line, bench/results.md (results-smoke.md for a smoke run), the raw
figures in bench/out/results.json, and the chart bench/results.png."""

import json
import os
import time
from dataclasses import asdict

from bench import BENCH, OUT
from bench.load import Results


def summary_line(results: Results) -> str:
    def case(server, model, concurrency, rows=1):
        return next(
            (
                c
                for c in results.cases
                if (c.server, c.model, c.concurrency, c.rows) == (server, model, concurrency, rows)
            ),
            None,
        )

    peers = [name for name in ("fastapi", "mlserver", "bentoml") if results.peers.get(name, "").startswith("ok")]

    def ratio(concurrency):
        ours = case("serveml", "lr", concurrency)
        best = max((case(p, "lr", concurrency).rps for p in peers if case(p, "lr", concurrency)), default=0)
        return ours.rps / best if ours and best else float("nan")

    c1 = case("serveml", "lr", 1)
    batch = case("serveml", "lr", 1, 100)
    floor_lr = results.floor_us.get("lr", {})
    fields = {
        "c1_p50_over_floor_ms": c1.p50_ms - floor_lr.get("row", 0) / 1000 if c1 else float("nan"),
        "c8_ratio_vs_best_peer": ratio(8),
        "c32_ratio_vs_best_peer": ratio(32),
        "batch100_per_row_vs_floor": (batch.p50_ms * 1000 / 100) / floor_lr["batch100_per_row"]
        if batch and floor_lr
        else float("nan"),
        "warm_deploy_s": results.deploy.get("warm_deploy_s", float("nan")),
        "cold_deploy_s": results.deploy.get("cold_deploy_s", float("nan")),
        "cold_start_s": results.deploy.get("cold_start_s", float("nan")),
    }
    return "summary: " + " ".join(f"{key}={value:.3f}" for key, value in fields.items())


def batch_rows(results: Results) -> list[str]:
    rows = []
    for c in results.cases:
        floor_row = results.floor_us.get(c.model, {}).get("batch100_per_row")
        if c.rows != 100 or not floor_row:
            continue
        per_row = c.p50_ms * 1000 / 100
        bound = (results.transport_ms.get(100, float("nan")) * 1000 + floor_row * 100) / (floor_row * 100)
        rows.append(f"| {c.server} | {c.model} | {per_row:.2f} | {per_row / floor_row:.2f} | {bound:.2f} |")
    return rows


def write_report(results: Results, line: str, smoke: bool) -> None:
    lines = [
        "# ServeML benchmark results",
        "",
        f"{'Smoke run (few requests: not for comparison)' if smoke else 'Full run'}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores. "
        "Ratios within this run are what count.",
        "",
        "## Servers",
        "",
        *[f"- **{name}**: {state}" for name, state in results.peers.items()],
        "",
        "## Prediction path",
        "",
        "Peak RSS is the whole server process tree; ServeML's is its runtime with both models loaded.",
        "",
        "| server | model | concurrency | rows/request | requests | req/s | p50 ms | p99 ms | errors | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {c.server} | {c.model} | {c.concurrency} | {c.rows} | {c.requests} | {c.rps:.0f} | {c.p50_ms:.2f} | "
            f"{c.p99_ms:.2f} | {c.errors} | {c.peak_rss_mb:.0f} |"
            for c in results.cases
        ],
        "",
        "## Floor: in-process `model.predict` in the model's environment",
        "",
        "| model | one row µs | per row in a batch of 100 µs |",
        "|---|---|---|",
        *[f"| {m} | {f['row']:.1f} | {f['batch100_per_row']:.2f} |" for m, f in results.floor_us.items()],
        "",
        "## Transport floor: uvicorn answering a constant, concurrency 1",
        "",
        "What HTTP alone costs here, whatever the server does with the request.",
        "",
        "| rows/request | p50 ms |",
        "|---|---|",
        *[f"| {rows} | {ms:.3f} |" for rows, ms in results.transport_ms.items()],
        "",
        "## Batch of 100 rows, per row",
        "",
        "A server's p50 per row of a 100-row request, against the in-process `predict` per row; the last "
        "column is what a server on the same HTTP stack could at best reach: transport floor plus `predict`, "
        "nothing else.",
        "",
        "| server | model | per row µs | × floor | transport + predict, × floor |",
        "|---|---|---|---|---|",
        *batch_rows(results),
        "",
        "## Deploy pipeline (local target, median of runs)",
        "",
        *[
            f"- {key}: {value:.2f}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in results.deploy.items()
        ],
        "",
        "## Memory",
        "",
        "The LogisticRegression's model process against a bare interpreter of its environment holding the same "
        "model. *Private* is what only that process holds (USS); RSS adds resident pages of shared libraries, "
        "mapped from the same files by every process of the environment.",
        "",
        "| process | at rest: RSS MB | private MB | after the load tests: RSS MB | private MB |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | "
            + " | ".join(
                f"{results.memory_mb[when][name][kind]:.1f}"
                for when in results.memory_mb
                for kind in ("RSS", "private")
            )
            + " |"
            for name in next(iter(results.memory_mb.values()), {})
        ],
        "",
        "```",
        line,
        "```",
        "",
    ]
    (BENCH / ("results-smoke.md" if smoke else "results.md")).write_text("\n".join(lines))
    (OUT / ("results-smoke.json" if smoke else "results.json")).write_text(json.dumps(asdict(results), indent=1))
    if not smoke:
        chart(results)


def chart(results: Results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    servers = list(dict.fromkeys(c.server for c in results.cases))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, model in zip(axes, ("lr", "rf"), strict=True):
        for offset, server in enumerate(servers):
            values = [
                next(
                    (
                        c.rps
                        for c in results.cases
                        if (c.server, c.model, c.concurrency, c.rows) == (server, model, conc, 1)
                    ),
                    0,
                )
                for conc in (1, 8, 32)
            ]
            axis.bar(
                [i + offset * 0.8 / len(servers) for i in range(3)], values, width=0.8 / len(servers), label=server
            )
        axis.set_xticks([i + 0.4 - 0.4 / len(servers) for i in range(3)], ["c1", "c8", "c32"])
        axis.set_title(f"{'LogisticRegression' if model == 'lr' else 'RandomForest(10)'}: requests/s, 1 row")
        axis.legend()
    fig.tight_layout()
    fig.savefig(BENCH / "results.png", dpi=110)
