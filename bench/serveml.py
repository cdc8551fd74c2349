"""ServeML itself, local target: its processes on free ports, deploys through the REST API, the
cold start, the floor (`model.predict` in the model's own sandbox) and the memory of a model process."""

import itertools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import httpx

from bench import LOGS, OUT, PYTHON, ROOT, ROW
from bench.load import Results, Setup, contract_bodies, measure
from bench.memory import descendants, model_processes, private, rss
from tests.support.processes import Redis, Service, Stack, free_port


@contextmanager
def serveml_stack(data_dir: Path):
    """Redis, web, worker and runtime: what `make run` starts, on free ports."""
    redis = Redis(log_dir=LOGS)
    stack = Stack(
        {
            "SERVEML_DATA_DIR": str(data_dir),
            "DATABASE_URL": f"sqlite:///{data_dir / 'bench.sqlite3'}",
            "CELERY_BROKER_URL": redis.url,
            "SERVEML_RUNTIME_TOKEN": os.urandom(16).hex(),
            "DJANGO_DEBUG": "1",
        },
        worker_concurrency=1,
        log_dir=LOGS,
    )
    web_url = f"http://127.0.0.1:{free_port()}"
    web = Service(
        "web",
        [PYTHON, "-m", "gunicorn", "serveml.wsgi", "-b", web_url.removeprefix("http://"), "-w", "2"],
        env=stack.env,
        log_dir=LOGS,
    )
    env = {**os.environ, **stack.env}
    try:
        redis.start()
        subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], env=env, cwd=ROOT, check=True)
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
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        web.start()
        stack.start()  # the worker connected to the broker, the runtime answering
        web.wait_answers(f"{web_url}/health", 60)
        yield {"web": web_url, "runtime": stack.runtime, "token": token, "env": stack.env}
    finally:
        web.stop()
        stack.stop()
        redis.stop()


def upload(stack, model_file: Path, requirements: str) -> str:
    """Upload through the API; returns the deployment's status URL."""
    response = httpx.post(
        f"{stack['web']}/api/deploy",
        headers={"Authorization": f"Token {stack['token']}"},
        timeout=60,
        files={
            "model_file": ("model.pkl", model_file.read_bytes()),
            "requirements_file": ("requirements.txt", requirements),
        },
    )
    response.raise_for_status()
    return response.json()["status_url"]


def wait_ready(stack, status_url: str, timeout: float = 600) -> dict:
    headers = {"Authorization": f"Token {stack['token']}"}
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(status_url, headers=headers, timeout=30).json()
        if state["status"] in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if state["status"] != "ready":
        raise RuntimeError(f"deployment {state['id']} did not become ready: {state['error'] or state['status']}")
    return state


def deploy(stack, model_file: Path, requirements: str) -> tuple[dict, float]:
    """Upload through the API and wait for ready; returns the deployment and upload → ready seconds."""
    started = time.monotonic()
    state = wait_ready(stack, upload(stack, model_file, requirements))
    return state, time.monotonic() - started


def unload(stack, deployment: dict) -> None:
    """Stop the deployment's model processes (its next request starts them again)."""
    env = stack["env"]
    httpx.post(
        f"{env['SERVEML_RUNTIME_URL']}/_unload/{deployment['id']}",
        headers={"Authorization": f"Bearer {env['SERVEML_RUNTIME_TOKEN']}"},
    ).raise_for_status()


def first_prediction(deployment: dict) -> float:
    """Seconds one prediction takes."""
    started = time.monotonic()
    httpx.post(deployment["endpoint_url"], json={"data": ROW}, timeout=60).raise_for_status()
    return time.monotonic() - started


def cold_start(stack, deployment: dict) -> float:
    """Stop the deployment's model processes, then time the first prediction."""
    unload(stack, deployment)
    return first_prediction(deployment)


@contextmanager
def sandboxed(environment: Path, code: str, model_file: Path):
    """The environment's interpreter as ServeML starts one, in the sandbox (never on the host),
    with the model at ./model.pkl; yields the interpreter's process and its pid."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "serveml.settings")
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


def placement(stack, deployment_id: str) -> tuple[Path, int]:
    """Where a deployment runs: its environment's folder and the uid of its processes (from the
    database: a process forked from a warm template names neither in its command line)."""
    out = subprocess.run(
        [
            PYTHON,
            "manage.py",
            "shell",
            "-c",
            "from deployments import sandbox; from deployments.environments import environment_path; "
            "from deployments.models import Deployment; "
            f"d = Deployment.objects.get(public_id='{deployment_id}'); "
            "print(environment_path(d.environment_key), sandbox.uid_for(d.pk))",
        ],
        env={**os.environ, **stack["env"]},
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return Path(out[-2]), int(out[-1])


def model_memory(environment: Path, model_file: Path, runtime_pid: int, uid: int) -> dict:
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
    models = model_processes(runtime_pid, uid)

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


def run_serveml(results: Results, setup: Setup):
    models, requirements, counts = setup.models, setup.requirements, setup.counts
    deploy_runs = counts["deploy_runs"]
    data_dir = Path(tempfile.mkdtemp(prefix="serveml-bench-", dir=OUT))
    try:
        with serveml_stack(data_dir) as stack:
            # Deploy pipeline. Cold: each run pins a new set of packages (so a new environment is
            # built), all already in uv's cache. Warm: the same requirements as an earlier deployment.
            sklearn_pin = requirements.strip()
            extras = [f"{n}=={version(n)}" for n in ("joblib", "threadpoolctl", "numpy", "scipy")]
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
            environment, uid = placement(stack, deployed["lr"]["id"])
            results.memory_mb["at rest"] = model_memory(environment, models["lr"], pid, uid)
            for name in ("rf", "lr"):
                results.floor_us[name] = floor(environment, models[name], counts["floor"])
            for name in ("rf", "lr"):
                url = deployed[name]["endpoint_url"]
                httpx.post(url, json={"data": ROW}).raise_for_status()
                measure(results, "serveml", name, url, pid, contract_bodies(), counts)
            # And once it has served the load tests: what its working memory grew to.
            results.memory_mb["after the load tests"] = model_memory(environment, models["lr"], pid, uid)
        results.peers["serveml"] = "ok"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
