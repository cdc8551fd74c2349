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
import itertools
import json
import os
import pickle
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = ROOT / ".venv" / "bin" / "python"
UV = ROOT / ".venv" / "bin" / "uv"
ROW = [5.1, 3.5, 1.4, 0.2]


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
    deploy: dict = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)  # "at rest" / "after the load tests" -> process -> RSS, private
    peers: dict = field(default_factory=dict)  # server -> "ok" or why it did not run


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.log = OUT / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            env={**os.environ, **(env or {})},
            cwd=cwd or ROOT,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_http(url: str, timeout: float, server: Server, method="GET", **kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            if httpx.request(method, url, timeout=2, **kwargs).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} did not answer at {url}; see {server.log}")


def descendants(pid: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    return sum(rss(p) for p in descendants(pid))


class PeakMemory:
    def __init__(self, pid: int):
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while self.running:
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def load(url: str, body: bytes, concurrency: int, requests: int, content_type="application/json") -> dict:
    """`wrk` sends `requests` POSTs over `concurrency` keep-alive connections, from its own process.

    One wrk thread: it is written in C and needs far less CPU than the servers it drives,
    which matters on two cores. Latencies come from its histogram, in microseconds.
    """
    requests = max(requests, concurrency)
    limit = max(60, requests // 50)  # seconds; only a server that drops connections gets near it
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{limit}s",
                "--timeout",
                "10s",
                "-s",
                BENCH / "fixed_requests.lua",
                url,
                "--",
                str(requests),
                body_file.name,
                content_type,
            ],
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


# ------------------------------------------------------------------ environments for the peers


def venv(name: str, packages: list[str]) -> Path | None:
    """A virtual environment of the peer's own; None (and why, in the log) if it cannot be installed."""
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
        (OUT / "logs").mkdir(parents=True, exist_ok=True)
        (OUT / "logs" / f"install-{name}.log").write_text(done.stdout + done.stderr)
        return None
    marker.write_text(wanted)
    return path


# ------------------------------------------------------------------ ServeML


@contextmanager
def serveml_stack(data_dir: Path):
    """Redis, web, worker and runtime: what `make run` starts, on free ports."""
    ports = {name: free_port() for name in ("redis", "web", "runtime")}
    env = {
        "SERVEML_DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'bench.sqlite3'}",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "SERVEML_RUNTIME_PORT": str(ports["runtime"]),
        "SERVEML_RUNTIME_URL": f"http://127.0.0.1:{ports['runtime']}",
        "SERVEML_RUNTIME_TOKEN": os.urandom(16).hex(),
        "DJANGO_DEBUG": "1",
    }
    started = [Server("redis", ["redis-server", "--port", ports["redis"], "--save", "", "--appendonly", "no"])]
    try:
        subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], env={**os.environ, **env}, cwd=ROOT, check=True)
        token = subprocess.run(
            [
                PYTHON,
                "manage.py",
                "shell",
                "-c",
                "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token; "
                "u, _ = User.objects.get_or_create(username='bench'); "
                "print(Token.objects.get_or_create(user=u)[0].key)",
            ],
            env={**os.environ, **env},
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        started.append(
            Server("web", [PYTHON, "-m", "gunicorn", "serveml.wsgi", "-b", f"127.0.0.1:{ports['web']}", "-w", "2"], env)
        )
        started.append(
            Server(
                "worker",
                [
                    PYTHON,
                    "-m",
                    "celery",
                    "-A",
                    "serveml",
                    "worker",
                    "--concurrency=1",
                    "--without-mingle",
                    "--without-gossip",
                ],
                env,
            )
        )
        runtime = Server("runtime", [PYTHON, "manage.py", "runtime", "--port", ports["runtime"]], env)
        started.append(runtime)
        wait_http(f"http://127.0.0.1:{ports['web']}/health", 60, started[1])
        wait_http(f"http://127.0.0.1:{ports['runtime']}/health", 60, runtime)
        time.sleep(2)  # the worker connects to the broker
        yield {"web": f"http://127.0.0.1:{ports['web']}", "runtime": runtime, "token": token, "env": env}
    finally:
        for server in reversed(started):
            server.stop()


def deploy(stack, model_file: Path, requirements: str) -> tuple[dict, float]:
    """Upload through the API and wait for ready; returns the deployment and upload → ready seconds."""
    headers = {"Authorization": f"Token {stack['token']}"}
    started = time.monotonic()
    response = httpx.post(
        f"{stack['web']}/api/deploy",
        headers=headers,
        timeout=60,
        files={
            "model_file": ("model.pkl", model_file.read_bytes()),
            "requirements_file": ("requirements.txt", requirements),
        },
    )
    response.raise_for_status()
    status_url = response.json()["status_url"]
    while True:
        state = httpx.get(status_url, headers=headers, timeout=30).json()
        if state["status"] in ("ready", "failed"):
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    if state["status"] != "ready":
        raise RuntimeError(f"deployment failed: {state['error']}")
    return state, elapsed


def cold_start(stack, deployment: dict) -> float:
    """Stop the deployment's model processes, then time the first prediction."""
    env = stack["env"]
    httpx.post(
        f"{env['SERVEML_RUNTIME_URL']}/_unload/{deployment['id']}",
        headers={"Authorization": f"Bearer {env['SERVEML_RUNTIME_TOKEN']}"},
    ).raise_for_status()
    started = time.monotonic()
    httpx.post(deployment["endpoint_url"], json={"data": ROW}, timeout=60).raise_for_status()
    return time.monotonic() - started


def private(pid: int) -> int:
    """Memory only this process holds (USS), in bytes: what one more model process costs.

    RSS also counts pages of shared libraries that every process of an environment maps
    from the same files; which of those pages happen to be resident varies by a few MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def model_processes(runtime_pid: int, deployment_id: str) -> list[int]:
    """The deployment's model processes: the interpreters inside its sandboxes (not bubblewrap),
    whose command line carries its id as a label."""
    found = []
    for pid in descendants(runtime_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[0] == b"/env/bin/python" and deployment_id.encode() in argv:
            found.append(pid)
    return found


def environment_of(runtime_pid: int, deployment_id: str) -> Path:
    """The deployment's own environment, as its sandbox binds it at /env."""
    for pid in descendants(runtime_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[0].endswith(b"bwrap") and deployment_id.encode() in argv:
            return Path(argv[argv.index(b"/env") - 1].decode())
    raise RuntimeError(f"no sandbox of {deployment_id} is running")


@contextmanager
def sandboxed(environment: Path, code: str, model_file: Path):
    """The environment's interpreter as ServeML starts one, in the sandbox (never on the host),
    with the model at ./model.pkl; yields the interpreter's process and its pid."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "serveml.settings")
    sys.path.insert(0, str(ROOT))
    django.setup()
    from deployments import sandbox

    launched = sandbox.launch(
        uid=sandbox.builder_uid() - 1,
        environment=environment,
        args=["-c", code],
        limits=sandbox.Limits(memory_bytes=2 * 1024**3, cpu_seconds=600),
        files={"model.pkl": model_file},
    )
    proc = subprocess.Popen(launched.argv, stdout=subprocess.PIPE, **launched.popen_kwargs())
    launched.started()
    try:
        yield (
            proc,
            lambda: next(
                p
                for p in descendants(proc.pid)
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/env/bin/python")
            ),
        )
    finally:
        if proc.poll() is None:  # killpg only before it is reaped: then its pid is still its own
            sandbox.kill_group(proc.pid)
        proc.communicate()
        launched.close()


def model_memory(environment: Path, model_file: Path, runtime_pid: int, deployment_id: str) -> dict:
    """A deployment's model processes against a bare interpreter holding the same model, in the
    same sandbox, in MB."""
    # Loaded and used once, as a model process is after its first request.
    code = (
        f"import pickle, time, numpy; m = pickle.load(open('model.pkl', 'rb')); "
        f"m.predict(numpy.asarray([{ROW}])); print('ok', flush=True); time.sleep(60)"
    )
    with sandboxed(environment, code, model_file) as (baseline, interpreter):
        baseline.stdout.readline()
        pid = interpreter()
        bare = {"RSS": rss(pid) / 1024**2, "private": private(pid) / 1024**2}
    models = model_processes(runtime_pid, deployment_id)

    def median(measure):
        return statistics.median(measure(pid) / 1024**2 for pid in models) if models else float("nan")

    return {
        "interpreter + model (bare python)": bare,
        "runtime model process (median)": {"RSS": median(rss), "private": median(private)},
        "runtime gateway": {"RSS": rss(runtime_pid) / 1024**2, "private": private(runtime_pid) / 1024**2},
    }


def floor(environment: Path, model_file: Path, repeats: int) -> dict:
    """In-process model.predict in the model's own environment and sandbox: the floor every server sits on."""
    script = f"""
import pickle, time, statistics, numpy as np, json
model = pickle.load(open("model.pkl", "rb"))
row = np.asarray([{ROW}]); batch = np.asarray([{ROW}] * 100)
def median(x, n):
    model.predict(x)
    times = []
    for _ in range(n):
        t = time.perf_counter(); model.predict(x); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6
print(json.dumps({{"row": median(row, {repeats}), "batch100_per_row": median(batch, {max(20, repeats // 10)}) / 100}}))
"""
    with sandboxed(environment, script, model_file) as (proc, _):
        out, _ = proc.communicate(timeout=600)
    return json.loads(out)


# ------------------------------------------------------------------ the measurements


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


def contract_bodies() -> dict:
    single = json.dumps({"data": ROW}).encode()
    batch = json.dumps({"instances": [ROW] * 100}).encode()
    return {"c1": (1, single, 1), "c8": (8, single, 1), "c32": (32, single, 1), "batch": (1, batch, 100)}


def v2_bodies() -> dict:
    def body(rows):
        return json.dumps(
            {"inputs": [{"name": "input-0", "shape": [rows, 4], "datatype": "FP64", "data": ROW * rows}]}
        ).encode()

    single, batch = body(1), body(100)
    return {"c1": (1, single, 1), "c8": (8, single, 1), "c32": (32, single, 1), "batch": (1, batch, 100)}


def run_serveml(results: Results, models: dict, requirements: str, counts: dict, deploy_runs: int):
    data_dir = Path(tempfile.mkdtemp(prefix="serveml-bench-", dir=OUT))
    try:
        with serveml_stack(data_dir) as stack:
            # Deploy pipeline. Cold: each run pins a new set of packages (so a new environment is
            # built), all already in uv's cache. Warm: the same requirements as an earlier deployment.
            sklearn_pin = requirements.strip()
            extras = [f"{n}=={v}" for n, v in installed_versions(["joblib", "threadpoolctl", "numpy", "scipy"])]
            pin_sets = [[e] for e in extras] + [list(pair) for pair in itertools.combinations(extras, 2)]
            cold_runs = [
                deploy(stack, models["lr"], "\n".join([sklearn_pin, *pins]) + "\n") for pins in pin_sets[:deploy_runs]
            ]
            deployed = {name: deploy(stack, models[name], requirements)[0] for name in ("rf", "lr")}
            warm_runs = [deploy(stack, models["lr"], requirements) for _ in range(deploy_runs)]
            cold, warm = [s for _, s in cold_runs], [s for _, s in warm_runs]
            # Only the two measured deployments stay loaded, so memory figures are theirs.
            for state, _ in cold_runs + warm_runs:
                httpx.delete(
                    state["status_url"], headers={"Authorization": f"Token {stack['token']}"}, timeout=60
                ).raise_for_status()
            starts = [cold_start(stack, deployed["lr"]) for _ in range(deploy_runs)]
            results.deploy = {
                "cold_deploy_s": statistics.median(cold),
                "warm_deploy_s": statistics.median(warm),
                "cold_start_s": statistics.median(starts),
                "runs": deploy_runs,
            }
            # At rest: the lr process has just started and answered the cold-start request.
            pid = stack["runtime"].proc.pid
            environment = environment_of(pid, deployed["lr"]["id"])
            results.memory_mb["at rest"] = model_memory(environment, models["lr"], pid, deployed["lr"]["id"])
            for name in ("rf", "lr"):
                results.floor_us[name] = floor(environment, models[name], counts["floor"])
            for name in ("rf", "lr"):
                url = deployed[name]["endpoint_url"]
                httpx.post(url, json={"data": ROW}).raise_for_status()
                measure(results, "serveml", name, url, pid, contract_bodies(), counts)
            # And once it has served the load tests: what its working memory grew to.
            results.memory_mb["after the load tests"] = model_memory(
                environment, models["lr"], pid, deployed["lr"]["id"]
            )
        results.peers["serveml"] = "ok"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def installed_versions(names: list[str]) -> list[tuple[str, str]]:
    from importlib.metadata import version

    return [(name, version(name)) for name in names]


def run_http_floor(results: Results, counts: dict):
    """p50 of a bare uvicorn app that answers a constant: what HTTP alone costs here, at concurrency 1."""
    port = free_port()
    server = Server(
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
        cwd=BENCH / "peers",
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, 30, server, method="POST", json={"data": ROW})
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
    server: Server,
    url: str,
    bodies: dict,
    counts: dict,
    ready_seconds: int,
    **ready_request,
) -> bool:
    """Wait until the peer answers at `url`, measure it, stop it. False, and why in
    results.peers, when it never answered or the load could not run."""
    try:
        wait_http(url, ready_seconds, server, method="POST", **ready_request)
        measure(results, peer, model, url, server.proc.pid, bodies, counts)
        return True
    except RuntimeError as exc:
        results.peers[peer] = f"failed: {exc}"
        return False
    finally:
        server.stop()


def run_fastapi(results: Results, models: dict, requirements: str, counts: dict):
    env = venv("fastapi", ["fastapi", "uvicorn[standard]", requirements.strip()])
    if env is None:
        results.peers["fastapi"] = "did not install (see bench/out/logs/install-fastapi.log)"
        return
    for name in ("rf", "lr"):
        port = free_port()
        server = Server(
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
            {"MODEL_PATH": str(models[name])},
            cwd=BENCH / "peers",
        )
        url = f"http://127.0.0.1:{port}/predict"
        if not measure_peer(results, "fastapi", name, server, url, contract_bodies(), counts, 60, json={"data": ROW}):
            return
    results.peers["fastapi"] = "ok: uvicorn --workers 2"


def run_mlserver(results: Results, models: dict, requirements: str, counts: dict):
    # MLServer 1.7's workers call asyncio.get_event_loop(), which uvloop 0.21+ refuses outside a loop.
    env = venv("mlserver", ["mlserver", "mlserver-sklearn", "uvloop<0.21", requirements.strip()])
    if env is None:
        results.peers["mlserver"] = "did not install (see bench/out/logs/install-mlserver.log)"
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
        server = Server(f"mlserver-{name}", [env / "bin" / "mlserver", "start", "."], cwd=folder)
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
    env = venv("bentoml", ["bentoml", requirements.strip()])
    if env is None:
        results.peers["bentoml"] = "did not install here (see bench/out/logs/install-bentoml.log)"
        return
    for name in ("rf", "lr"):
        port = free_port()
        server = Server(
            f"bentoml-{name}",
            [env / "bin" / "bentoml", "serve", "bentoml_service:Classifier", "--port", port],
            {"MODEL_PATH": str(models[name]), "BENTOML_DO_NOT_TRACK": "true"},
            cwd=BENCH / "peers",
        )
        url = f"http://127.0.0.1:{port}/predict"
        if not measure_peer(results, "bentoml", name, server, url, contract_bodies(), counts, 120, json={"data": ROW}):
            return
    results.peers["bentoml"] = "ok: workers=2"


# ------------------------------------------------------------------ report


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="few requests, ServeML and FastAPI only")
    args = parser.parse_args(argv)
    counts = (
        {"warmup": 20, "c1": 50, "c8": 100, "c32": 100, "batch": 20, "floor": 50}
        if args.smoke
        else {"warmup": 300, "c1": 2000, "c8": 10000, "c32": 10000, "batch": 500, "floor": 2000}
    )
    OUT.mkdir(parents=True, exist_ok=True)
    import sklearn

    sys.path.insert(0, str(ROOT))
    from deployments.allowlist import corpus

    requirements = f"scikit-learn=={sklearn.__version__}\n"
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = corpus.iris()
    models = {}
    for name, model in {
        "rf": RandomForestClassifier(n_estimators=10, random_state=0),
        "lr": LogisticRegression(max_iter=500),
    }.items():
        models[name] = OUT / f"{name}.pkl"
        models[name].write_bytes(pickle.dumps(model.fit(X, y)))

    results = Results()
    print("ServeML (local target)", flush=True)
    run_serveml(results, models, requirements, counts, deploy_runs=2 if args.smoke else 5)
    print("Transport floor (uvicorn answering a constant)", flush=True)
    run_http_floor(results, counts)
    print("FastAPI + uvicorn", flush=True)
    run_fastapi(results, models, requirements, counts)
    if not args.smoke:
        print("MLServer + mlserver-sklearn", flush=True)
        run_mlserver(results, models, requirements, counts)
        print("BentoML", flush=True)
        run_bentoml(results, models, requirements, counts)
    line = summary_line(results)
    write_report(results, line, args.smoke)
    for name, state in results.peers.items():
        print(f"{name}: {state}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
