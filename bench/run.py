"""`make bench`: ServeML's prediction path and deploy pipeline, side by side with the
servers a user would pick instead, in one run on this machine.

    python bench/run.py            # the full benchmark (several minutes)
    python bench/run.py --smoke    # a few requests per case: what `make test` runs

Each server runs alone while it is measured; the load comes from `wrk` in its
own process, a fixed number of requests per case after a warm-up. Ratios between
servers of the same run are what count: absolute numbers on a shared 2-core
machine move from run to run.
"""

import argparse
import pickle
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python bench/run.py`: the repo root in place of bench/ on the path, as with `python -m bench.run`,
    # so that `bench`, `tests` and `deployments` import as packages and bench's modules shadow nothing.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import OUT  # noqa: E402
from bench.aws_image import run_aws_image  # noqa: E402
from bench.density import run_density  # noqa: E402
from bench.load import Results, Setup  # noqa: E402
from bench.metrics_cost import run_metrics_cost  # noqa: E402
from bench.peers import run_bentoml, run_fastapi, run_http_floor, run_mlserver  # noqa: E402
from bench.report import summary_line, write_report  # noqa: E402
from bench.serveml import run_serveml  # noqa: E402

# The sections, in the order they run: (name, what it prints, function(results, setup), in --smoke).
# Each measures alone and adds its figures to `results`; a new section is one more line here.
SECTIONS = [
    ("serveml", "ServeML (local target)", run_serveml, True),
    ("density", "Many deployments: memory at 1, 10 and 100 loaded, cold starts, Zipf traffic", run_density, True),
    ("transport", "Transport floor (uvicorn answering a constant, alone and via a child)", run_http_floor, True),
    ("fastapi", "FastAPI + uvicorn", run_fastapi, True),
    ("mlserver", "MLServer + mlserver-sklearn, as is and with adaptive batching", run_mlserver, False),
    ("bentoml", "BentoML, as is and with a batchable API", run_bentoml, False),
    ("metrics-cost", "Metrics cost: the runtime at HEAD against the one before metrics", run_metrics_cost, True),
    ("aws-image", "aws target: the Lambda image's sizes and build times", run_aws_image, True),
]


def models() -> dict:
    """The iris RandomForestClassifier(n_estimators=10) and LogisticRegression, pickled into bench/out."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    from deployments.allowlist import corpus

    X, y = corpus.iris()
    files = {}
    for name, model in {
        "rf": RandomForestClassifier(n_estimators=10, random_state=0),
        "lr": LogisticRegression(max_iter=500),
    }.items():
        files[name] = OUT / f"{name}.pkl"
        files[name].write_bytes(pickle.dumps(model.fit(X, y)))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="few requests; no MLServer or BentoML")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[name for name, *_ in SECTIONS],
        help="run only these sections (figures of the others are missing from the report)",
    )
    args = parser.parse_args(argv)
    counts = (
        {"warmup": 20, "c1": 50, "c8": 100, "c32": 100, "batch": 20, "floor": 50, "deploy_runs": 2}
        | {"ab_rounds": 1, "ab_requests": 200}
        if args.smoke
        else {"warmup": 300, "c1": 2000, "c8": 10000, "c32": 10000, "batch": 500, "floor": 2000, "deploy_runs": 5}
        | {"ab_rounds": 6, "ab_requests": 30000}
    )
    OUT.mkdir(parents=True, exist_ok=True)
    import sklearn

    setup = Setup(models(), f"scikit-learn=={sklearn.__version__}\n", counts, args.smoke)
    results = Results()
    for name, title, section, in_smoke in SECTIONS:
        if (args.only and name not in args.only) or (args.smoke and not in_smoke and not args.only):
            continue
        print(title, flush=True)
        section(results, setup)
    line = summary_line(results)
    write_report(results, line, args.smoke)
    for name, state in results.peers.items():
        print(f"{name}: {state}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
