"""Many models on one host: ServeML's runtime memory with 1, 10 and 100 deployments loaded, beside
MLServer serving the same models from one server (multi-model serving: cheap, but every model in one
process, with no isolation between them); the first request to a deployment whose model processes
are stopped (cold start); and 100 deployments under Zipf-distributed traffic at concurrency 32.

Each deployment is a distinct small model (a LogisticRegression fitted with its own C on its own
half of iris), uploaded through the REST API like any other. Memory is read from /proc over the
runtime's whole process tree (gateway, templates, model processes): PSS, in which a page shared by
a template and its forks counts once in total, and the private memory (USS) of each deployment's
processes.
"""

import json
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench import LOGS, OUT, ROW
from bench.load import load
from bench.memory import descendants, private, uid_of
from bench.peers import venv
from bench.serveml import cold_start, first_prediction, serveml_stack, unload, upload, wait_ready
from deployments.runtime.memory import pss
from tests.support.processes import Service, free_port

SANDBOX_UID_BASE = 2_000_000  # serveml/settings.py's default: the templates run as it, deployments above it


def distinct_models(count: int, folder: Path) -> list[Path]:
    from sklearn.linear_model import LogisticRegression

    from deployments.allowlist import corpus

    X, y = corpus.iris()
    files = []
    for number in range(count):
        rows = [i for i in range(len(y)) if (i * 7 + number) % 2 == 0]
        model = LogisticRegression(C=0.5 + number / 10, max_iter=500).fit(X[rows], y[rows])
        files.append(folder / f"density-{number}.pkl")
        files[-1].write_bytes(pickle.dumps(model))
    return files


def deploy_all(stack: dict, files: list[Path], requirements: str) -> list[dict]:
    """Upload every model at once (the worker takes them in turn), then wait for all of them."""
    status_urls = [upload(stack, file, requirements) for file in files]
    return [wait_ready(stack, url) for url in status_urls]


def runtime_memory(runtime_pid: int) -> dict:
    """The runtime's whole tree: PSS in MB, and the private MB of each deployment's processes
    (those running as a deployment's uid: the namespace's init and the model server)."""
    tree = descendants(runtime_pid)
    per_deployment: dict[int, int] = {}
    for pid in tree:
        uid = uid_of(pid)
        if uid is not None and uid > SANDBOX_UID_BASE:
            per_deployment[uid] = per_deployment.get(uid, 0) + private(pid)
    return {
        "pss_mb": sum(pss(pid) for pid in tree) / 1024**2,
        "deployments": len(per_deployment),
        "private_mb_per_deployment": (
            statistics.median(per_deployment.values()) / 1024**2 if per_deployment else float("nan")
        ),
    }


def zipf_load(base_url: str, deployments: list[dict], concurrency: int, requests: int) -> dict:
    body = json.dumps({"data": ROW}).encode()
    paths = [deployment["endpoint_url"].removeprefix(base_url) for deployment in deployments]
    return load(base_url, body, concurrency, requests, paths=paths)


def tree_pss_mb(pid: int) -> float:
    return sum(pss(p) for p in descendants(pid)) / 1024**2


def mlserver_memory(results, files: list[Path], steps: tuple[int, ...]) -> dict:
    """MLServer holding the same models in one server: its process tree's PSS with 1, 10 and all of
    them loaded through its model repository API. `parallel_workers: 0` keeps every model in the
    one process, its least memory (with N workers each loads every model)."""
    env = venv(results, "mlserver")
    if env is None:
        return {"not run": results.peers.get("mlserver", "no environment")}
    root = OUT / "mlserver-many"
    shutil.rmtree(root, ignore_errors=True)
    for number, file in enumerate(files):
        folder = root / f"m{number}"
        folder.mkdir(parents=True)
        shutil.copy(file, folder / "model.joblib")
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": f"m{number}",
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": "v1"},
                }
            )
        )
    port = free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "parallel_workers": 0,
                "load_models_at_startup": False,
            }
        )
    )
    server = Service("mlserver-many", [env / "bin" / "mlserver", "start", "."], cwd=root, log_dir=LOGS)
    base = f"http://127.0.0.1:{port}"
    memory, loaded = {}, 0
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    try:
        server.start()
        server.wait_answers(f"{base}/v2/health/live", 180)
        for step in steps:
            for number in range(loaded, step):
                httpx.post(f"{base}/v2/repository/models/m{number}/load", timeout=120).raise_for_status()
                httpx.post(f"{base}/v2/models/m{number}/infer", json=body, timeout=60).raise_for_status()
            loaded = step
            time.sleep(1)
            memory[step] = {"pss_mb": tree_pss_mb(server.proc.pid)}
            print(f"  MLServer, {step:3} models loaded: {memory[step]['pss_mb']:7.1f} MB (PSS)", flush=True)
    finally:
        server.stop()
    return memory


def run_density(results, setup) -> None:
    count = 12 if setup.smoke else 100
    steps = (1, 10, count)
    data_dir = Path(tempfile.mkdtemp(prefix="serveml-density-", dir=OUT))
    files = distinct_models(count, data_dir)
    with serveml_stack(data_dir) as stack:
        deployments = deploy_all(stack, files, setup.requirements)
        runtime_pid = stack["runtime"].proc.pid
        for deployment in deployments:
            unload(stack, deployment)
        memory, loaded = {}, 0
        first_prediction(deployments[0])  # the template starts with the first: counted at 1 loaded, as on a fresh host
        for step in steps:
            for deployment in deployments[loaded:step]:
                first_prediction(deployment)
            loaded = step
            time.sleep(1)
            memory[step] = runtime_memory(runtime_pid)
            print(
                f"  {step:3} loaded: runtime {memory[step]['pss_mb']:7.1f} MB (PSS), "
                f"{memory[step]['private_mb_per_deployment']:.1f} MB private per deployment",
                flush=True,
            )
        # Cold starts: the deployment's processes stopped, its environment's template warm.
        starts = []
        for deployment in deployments[: 5 if setup.smoke else 30]:
            starts.append(cold_start(stack, deployment))
        base_url = stack["env"]["SERVEML_RUNTIME_URL"]
        requests = 500 if setup.smoke else 20000
        zipf_load(base_url, deployments, 32, requests // 10)  # warm-up
        zipf = zipf_load(base_url, deployments, 32, requests)
        print(
            f"  cold start p50 {statistics.median(starts) * 1000:.1f} ms; {count} deployments, Zipf c32: "
            f"{zipf['rps']:.0f} req/s p99 {zipf['p99_ms']:.1f} ms errors {zipf['errors']}",
            flush=True,
        )
    peer = mlserver_memory(results, files, steps) if not setup.smoke else {"not run": "smoke run"}
    results.density = {
        "deployments": count,
        "memory": memory,
        "mlserver_memory": peer,
        "mb_per_additional_model": (memory[count]["pss_mb"] - memory[10]["pss_mb"]) / (count - 10),
        "model_file_kb": statistics.median(file.stat().st_size for file in files) / 1024,
        "cold_start_ms": [s * 1000 for s in starts],
        "zipf": zipf,
    }


def density_lines(results) -> list[str]:
    """results.md's section: memory by deployments loaded, beside MLServer's; cold starts; Zipf."""
    density = results.density
    if not density:
        return ["Not run."]
    peer = density.get("mlserver_memory", {})
    lines = [
        f"{density['deployments']} deployments of distinct LogisticRegression models "
        f"({density['model_file_kb']:.1f} KB each), uploaded through the API. Memory is the PSS of the runtime's "
        "whole process tree (gateway, warm template, model processes: a page shared by a template and its forks "
        "counts once) and, per deployment, the private memory (USS) of its processes. MLServer serves the same "
        "models from one process (`parallel_workers: 0`, loaded through its repository API): cheaper, with no "
        "isolation between them.",
        "",
        "| deployments loaded | ServeML runtime MB | ServeML private MB per deployment | MLServer MB |",
        "|---|---|---|---|",
    ]
    for step, figures in density["memory"].items():
        theirs = peer.get(step, {}).get("pss_mb")
        lines.append(
            f"| {step} | {figures['pss_mb']:.0f} | {figures['private_mb_per_deployment']:.1f} | "
            f"{f'{theirs:.0f}' if theirs is not None else peer.get('not run', '-')} |"
        )
    starts, zipf = density["cold_start_ms"], density["zipf"]
    lines += [
        "",
        f"Each additional loaded deployment: **{density['mb_per_additional_model']:.1f} MB** "
        "(the runtime's PSS from 10 to all loaded, per deployment).",
        "",
        f"Cold start (first request to a deployment whose model processes were stopped, its template warm), "
        f"{len(starts)} deployments: p50 **{statistics.median(starts):.0f} ms**, max {max(starts):.0f} ms.",
        "",
        f"All {density['deployments']} deployments at concurrency 32, each request to one of them with Zipf "
        f"probabilities (s = 1.1): {zipf['requests']} requests, {zipf['rps']:.0f} req/s, p50 {zipf['p50_ms']:.2f} ms, "
        f"p99 **{zipf['p99_ms']:.2f} ms**, errors {zipf['errors']}.",
    ]
    return lines
