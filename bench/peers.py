"""The servers ServeML is compared with, each in a virtual environment of its own and measured
alone: FastAPI + uvicorn, MLServer, BentoML; and the transport floor, a bare uvicorn app that
answers a constant, alone and through a child process."""

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench import APPS, LOCKS, LOGS, OUT, ROOT, ROW, UV
from bench.load import Results, Setup, contract_bodies, instances_bodies, load, measure, v2_bodies
from tests.support.processes import NotReady, Service, free_port


def venv(results: Results, name: str) -> Path | None:
    """The peer's own virtual environment, installed from its lock file `bench/locks/<name>.txt`;
    None, and why in results.peers and in the log, if it cannot be installed."""
    import sklearn

    lock = LOCKS / f"{name}.txt"
    wanted = lock.read_text()
    # The peers unpickle the models this interpreter pickled: the same scikit-learn, or they would
    # warn about (or fail on) another release's pickles.
    if f"scikit-learn=={sklearn.__version__}" not in wanted.splitlines():
        results.peers[name] = (
            f"not run: {lock.relative_to(ROOT)} pins another scikit-learn than {sklearn.__version__}; "
            "recompile it (see bench/README.md)"
        )
        return None
    path = OUT / "venvs" / name
    marker = path / ".installed"
    if marker.exists() and marker.read_text() == wanted:
        return path
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(path)], check=True)
    done = subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", str(path / "bin" / "python"), "-r", str(lock)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / f"install-{name}.log").write_text(done.stdout + done.stderr)
        results.peers[name] = f"did not install (see bench/out/logs/install-{name}.log)"
        return None
    marker.write_text(wanted)
    return path


def run_http_floor(results: Results, setup: Setup):
    """p50 at concurrency 1 of a bare uvicorn app that answers a constant (what HTTP alone costs
    here) and of the same app answering through a child process (hop_floor.py: what keeping the
    model in another process costs at least). Alternating rounds, the median of each: the two
    are compared with each other, and machine noise moves both."""
    servers, urls = {}, {}
    try:
        for app in ("http_floor", "hop_floor"):
            port = free_port()
            servers[app] = Service(
                app.replace("_", "-"),
                [ROOT / ".venv" / "bin" / "uvicorn", f"{app}:app", "--port", port]
                + ["--log-level", "warning", "--no-access-log"],
                cwd=APPS,
                log_dir=LOGS,
            ).start()
            urls[app] = f"http://127.0.0.1:{port}/"
            servers[app].wait_answers(urls[app], 30, method="POST", json={"data": ROW})
        for concurrency, body, rows in contract_bodies().values():
            if concurrency != 1:
                continue
            p50s = {app: [] for app in urls}
            for url in urls.values():
                load(url, body, 1, setup.counts["warmup"])
            for round_ in range(3):
                for app in urls if round_ % 2 == 0 else reversed(urls):
                    p50s[app].append(load(urls[app], body, 1, setup.counts["c1"])["p50_ms"])
            results.transport_ms[rows] = statistics.median(p50s["http_floor"])
            results.hop_ms[rows] = statistics.median(p50s["hop_floor"])
            print(
                f"  constant answer, {rows} row(s) sent: p50 {results.transport_ms[rows]:.3f} ms, "
                f"through a child process {results.hop_ms[rows]:.3f} ms",
                flush=True,
            )
    finally:
        for server in servers.values():
            server.stop()


def measure_peer(
    results: Results,
    peer: str,
    model: str,
    server: Service,
    url: str,
    bodies: dict,
    counts: dict,
    ready_seconds: int,
    **ready_request,
) -> bool:
    """Start the peer, wait until it answers at `url`, measure it, stop it. False, and why in
    results.peers, when it never answered or the load could not run."""
    try:
        server.start()
        server.wait_answers(url, ready_seconds, method="POST", **ready_request)
        measure(results, peer, model, url, server.proc.pid, bodies, counts)
        return True
    except (NotReady, RuntimeError) as exc:
        results.peers[peer] = f"failed: {str(exc).splitlines()[0]} (see {server.log.relative_to(ROOT)})"
        return False
    finally:
        server.stop()


def measure_json_peer(
    results: Results,
    peer: str,
    counts: dict,
    server: Callable[[str, int], Service],
    ready_seconds: int,
    ok: str,
    bodies: dict | None = None,
):
    """A peer that takes JSON at /predict (ServeML's contract unless `bodies` says otherwise): each
    model on a server of its own, `server(model, port)`; `ok` in results.peers once both were measured."""
    bodies = bodies or contract_bodies()
    for name in ("rf", "lr"):
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        ready = {"content": bodies["c1"][1], "headers": {"Content-Type": "application/json"}}
        if not measure_peer(results, peer, name, server(name, port), url, bodies, counts, ready_seconds, **ready):
            return
    results.peers[peer] = ok


def run_fastapi(results: Results, setup: Setup):
    env = venv(results, "fastapi")
    if env is None:
        return

    def server(name: str, port: int) -> Service:
        return Service(
            f"fastapi-{name}",
            [
                env / "bin" / "uvicorn",
                "fastapi_app:app",
                "--port",
                port,
                "--workers",
                "2",
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env={"MODEL_PATH": str(setup.models[name])},
            cwd=APPS,
            log_dir=LOGS,
        )

    measure_json_peer(results, "fastapi", setup.counts, server, 60, "ok: uvicorn --workers 2")


# Each peer runs in every configuration listed here, and the summary counts the best of them.
# Adaptive batching's values are chosen for this load: at most one request in flight per
# connection, so a batch of the highest concurrency (32); a window of a few predictions' time.
MLSERVER_CONFIGS = {
    "mlserver": ({}, "parallel_workers 2"),
    "mlserver-batching": (
        {"max_batch_size": 32, "max_batch_time": 0.005},
        "parallel_workers 2, adaptive batching (model-settings.json: max_batch_size 32, max_batch_time 0.005 s)",
    ),
}


def run_mlserver(results: Results, setup: Setup):
    env = venv(results, "mlserver")
    if env is None:
        return
    for peer, (batching, described) in MLSERVER_CONFIGS.items():
        if mlserver_config(results, setup, env, peer, batching):
            results.peers[peer] = f"ok: {described} (uvloop<0.21, which MLServer 1.7 needs)"


def mlserver_config(results: Results, setup: Setup, env: Path, peer: str, batching: dict) -> bool:
    for name in ("rf", "lr"):
        folder = OUT / peer / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy(setup.models[name], folder / "model.joblib")
        port, grpc, metrics = free_port(), free_port(), free_port()
        (folder / "settings.json").write_text(
            json.dumps({"http_port": port, "grpc_port": grpc, "metrics_port": metrics, "parallel_workers": 2})
        )
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": "v1"},
                    **batching,
                }
            )
        )
        server = Service(f"{peer}-{name}", [env / "bin" / "mlserver", "start", "."], cwd=folder, log_dir=LOGS)
        url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
        bodies = v2_bodies()
        # Ready only once an inference answers: MLServer's workers load the model after /ready.
        if not measure_peer(
            results,
            peer,
            name,
            server,
            url,
            bodies,
            setup.counts,
            180,
            content=bodies["c1"][1],
            headers={"Content-Type": "application/json"},
        ):
            return False
    return True


# service class in apps/bentoml_service.py, the bodies it takes, what results.md says of it
BENTOML_CONFIGS = {
    "bentoml": ("Classifier", contract_bodies, "workers=2"),
    "bentoml-batchable": (
        "BatchedClassifier",
        instances_bodies,
        "workers=2, adaptive batching: @bentoml.api(batchable=True, batch_dim=0, max_batch_size=100, "
        "max_latency_ms=1000), every request a list of rows",
    ),
}


def run_bentoml(results: Results, setup: Setup):
    env = venv(results, "bentoml")
    if env is None:
        return
    for peer, (service, bodies, described) in BENTOML_CONFIGS.items():

        def server(name: str, port: int, service=service, peer=peer) -> Service:
            return Service(
                f"{peer}-{name}",
                [env / "bin" / "bentoml", "serve", f"bentoml_service:{service}", "--port", port],
                env={"MODEL_PATH": str(setup.models[name]), "BENTOML_DO_NOT_TRACK": "true"},
                cwd=APPS,
                log_dir=LOGS,
            )

        measure_json_peer(results, peer, setup.counts, server, 120, f"ok: {described}", bodies())
