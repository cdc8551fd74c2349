"""The servers ServeML is compared with, each in a virtual environment of its own and measured
alone: FastAPI + uvicorn, MLServer, BentoML; and the transport floor, a bare uvicorn app that
answers a constant."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench import APPS, LOGS, OUT, ROOT, ROW, UV
from bench.load import Results, contract_bodies, load, measure, v2_bodies
from tests.support.processes import NotReady, Service, free_port


def venv(results: Results, name: str, packages: list[str]) -> Path | None:
    """A virtual environment of the peer's own; None, and why in results.peers and in the log, if it
    cannot be installed."""
    path = OUT / "venvs" / name
    marker = path / ".installed"
    wanted = "\n".join(packages)
    if marker.exists() and marker.read_text() == wanted:
        return path
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(path)], check=True)
    done = subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", str(path / "bin" / "python"), *packages],
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


def run_http_floor(results: Results, counts: dict):
    """p50 of a bare uvicorn app that answers a constant: what HTTP alone costs here, at concurrency 1."""
    port = free_port()
    server = Service(
        "http-floor",
        [
            ROOT / ".venv" / "bin" / "uvicorn",
            "http_floor:app",
            "--port",
            port,
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=APPS,
        log_dir=LOGS,
    ).start()
    try:
        url = f"http://127.0.0.1:{port}/"
        server.wait_answers(url, 30, method="POST", json={"data": ROW})
        for concurrency, body, rows in contract_bodies().values():
            if concurrency == 1:
                load(url, body, 1, counts["warmup"])
                results.transport_ms[rows] = load(url, body, 1, counts["c1"])["p50_ms"]
                print(f"  constant answer, {rows} row(s) sent: p50 {results.transport_ms[rows]:.3f} ms", flush=True)
    finally:
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


def measure_contract_peer(
    results: Results, peer: str, counts: dict, server: Callable[[str, int], Service], ready_seconds: int, ok: str
):
    """A peer that takes ServeML's JSON contract at /predict: each model on a server of its own,
    `server(model, port)`; `ok` in results.peers once both were measured."""
    for name in ("rf", "lr"):
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        if not measure_peer(
            results, peer, name, server(name, port), url, contract_bodies(), counts, ready_seconds, json={"data": ROW}
        ):
            return
    results.peers[peer] = ok


def run_fastapi(results: Results, models: dict, requirements: str, counts: dict):
    env = venv(results, "fastapi", ["fastapi", "uvicorn[standard]", requirements.strip()])
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
            env={"MODEL_PATH": str(models[name])},
            cwd=APPS,
            log_dir=LOGS,
        )

    measure_contract_peer(results, "fastapi", counts, server, 60, "ok: uvicorn --workers 2")


def run_mlserver(results: Results, models: dict, requirements: str, counts: dict):
    # MLServer 1.7's workers call asyncio.get_event_loop(), which uvloop 0.21+ refuses outside a loop.
    env = venv(results, "mlserver", ["mlserver", "mlserver-sklearn", "uvloop<0.21", requirements.strip()])
    if env is None:
        return
    for name in ("rf", "lr"):
        folder = OUT / "mlserver" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy(models[name], folder / "model.joblib")
        port, grpc, metrics = free_port(), free_port(), free_port()
        (folder / "settings.json").write_text(
            json.dumps(
                {
                    "http_port": port,
                    "grpc_port": grpc,
                    "metrics_port": metrics,
                    "parallel_workers": 2,
                }
            )
        )
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": "v1"},
                }
            )
        )
        server = Service(f"mlserver-{name}", [env / "bin" / "mlserver", "start", "."], cwd=folder, log_dir=LOGS)
        url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
        bodies = v2_bodies()
        # Ready only once an inference answers: MLServer's workers load the model after /ready.
        if not measure_peer(
            results,
            "mlserver",
            name,
            server,
            url,
            bodies,
            counts,
            180,
            content=bodies["c1"][1],
            headers={"Content-Type": "application/json"},
        ):
            return
    results.peers["mlserver"] = "ok: parallel_workers 2 (uvloop<0.21, which MLServer 1.7 needs)"


def run_bentoml(results: Results, models: dict, requirements: str, counts: dict):
    env = venv(results, "bentoml", ["bentoml", requirements.strip()])
    if env is None:
        return

    def server(name: str, port: int) -> Service:
        return Service(
            f"bentoml-{name}",
            [env / "bin" / "bentoml", "serve", "bentoml_service:Classifier", "--port", port],
            env={"MODEL_PATH": str(models[name]), "BENTOML_DO_NOT_TRACK": "true"},
            cwd=APPS,
            log_dir=LOGS,
        )

    measure_contract_peer(results, "bentoml", counts, server, 120, "ok: workers=2")
