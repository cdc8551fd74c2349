"""The runtime's live metrics (deployments/runtime/metrics.py) and the figures on a deployment's page.

In this process: a Runtime and a real sandboxed model process with a stand-in handler that
can crash (502), counted through the runtime's own ASGI entry; /metrics parsed with
prometheus_client's text parser; the rows predicted (JSON data, instances, records and a V2
infer) and none for refused requests. End to end: a deployment through the real worker and
runtime, its answers (200, 400 from the runtime, 400 from the handler, V2) in /metrics by
version after a promote, and on the page. The page with the runtime down says "figures
unavailable"."""

import time
import timeit

import httpx
import orjson
import pytest
from django.conf import settings
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from deployments.models import Deployment
from deployments.runtime import metrics
from deployments.runtime.access import Access
from deployments.runtime.metrics import BOUNDS, Stats, quantile
from deployments.runtime.pool import ModelPool
from deployments.runtime.registry import Spec
from tests.conftest import stand_in_build
from tests.test_runtime_pool import environment, run  # noqa: F401  (environment: a fixture)
from tests.test_versions import new_version, root, runtime  # noqa: F401  (root, runtime: fixtures)
from tests.test_versions import ready as ready_version
from tests.test_versions_e2e import wait_promoted

# Answers every request with 200, except one that kills its model process (each time: the
# runtime gives it a second process, then answers 502).
HANDLER = """
import os, signal

def model():
    pass

def handle_many(bodies):
    if b'{"kill": true}' in bodies:
        os.kill(os.getpid(), signal.SIGKILL)
    return [(200, b'{"prediction": 1}') for body in bodies]
"""


def parse(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(deployment: str, version: int, **more) -> frozenset:
    return frozenset({"deployment": deployment, "version": str(version), **more}.items())


async def call(runtime, method: str, path: str, body: bytes = b"", token: str | None = None):
    sent = []
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await runtime({"type": "http", "path": path, "method": method, "headers": headers}, receive, send)
    return sent[0]["status"], sent[1]["body"]


def test_a_histogram_gives_quantiles_within_the_bucket_that_holds_them():
    buckets = [0] * (len(BOUNDS) + 1)
    assert quantile(0.5, buckets) is None
    fast, slow = BOUNDS.index(0.001), BOUNDS.index(0.25)  # 90 answers in (0.5 ms, 1 ms], 10 in (100 ms, 250 ms]
    buckets[fast], buckets[slow] = 90, 10
    assert 0.0005 < quantile(0.5, buckets) <= 0.001
    assert quantile(0.9, buckets) == 0.001
    assert 0.1 < quantile(0.99, buckets) <= 0.25
    buckets[-1] = 1000  # slower than every bound: the last bound is all a histogram knows
    assert quantile(0.99, buckets) == BOUNDS[-1]


def test_the_last_minute_counts_only_what_came_after_a_sample_a_minute_old(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    stats = Stats("d", 1)
    for _ in range(5):
        stats.record(200, clock[0] - 0.002)
    clock[0] += metrics.SAMPLE_SECONDS
    stats.sample(clock[0])
    clock[0] += metrics.WINDOW
    stats.record(500, clock[0] - 0.002)
    statuses, buckets, rows = stats.window(clock[0])
    assert rows == 0
    assert sum(buckets) == 1 and statuses[5] == 1 and statuses[2] == 0  # the five are older than a minute
    assert stats.requests == 6 and stats.statuses[2] == 5


def test_the_last_hour_is_minute_by_minute_with_every_version_of_a_deployment(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    v1, v2 = Stats("d", 1), Stats("d", 2)
    for _ in range(120):
        v1.record(200, clock[0] - 0.002)
    clock[0] += metrics.SAMPLE_SECONDS
    v1.sample(clock[0])
    v2.sample(clock[0])
    clock[0] += 30 * 60  # half an hour later
    for _ in range(6):
        v2.record(500, clock[0] - 0.2)
    hour = metrics.last_hour([v1, v2], clock[0])
    assert len(hour) == 60
    busy = [minute for minute in hour if minute["requests_per_second"]]
    assert busy == [hour[29], hour[59]]  # 30 minutes ago, and the last minute
    assert hour[29]["requests_per_second"] == 2 and hour[29]["errors"] == 0 and hour[29]["p99_seconds"] < 0.0025
    assert hour[59]["requests_per_second"] == 0.1 and hour[59]["errors"] == 6 and hour[59]["p99_seconds"] > 0.1


def test_counting_an_answer_costs_about_a_microsecond():
    stats = Stats("d", 1)
    started = time.perf_counter()
    best = min(timeit.repeat(lambda: stats.record(200, started), number=10_000, repeat=5)) / 10_000
    assert best < 10e-6  # about 0.3 µs here; a generous ceiling for a slow shared core


def test_the_runtime_counts_each_answer_by_status_and_serves_them_to_prometheus_with_its_token(
    environment,  # noqa: F811
    tmp_path,
):
    from deployments.runtime.app import Runtime

    async def scenario():
        model = stand_in_build(tmp_path / "build", HANDLER)
        spec = Spec("0f0e0d0c-0000-4000-8000-000000000000", environment, tmp_path / "build", model, 2_000_997)
        pool = ModelPool(spec, Access(), max_size=1)
        runtime = Runtime(max_processes=1)
        deployment_id = pool.spec.deployment_id
        runtime.pools[deployment_id] = pool
        runtime.metrics.stats[deployment_id] = pool.stats = Stats(deployment_id, 1)  # what track() labels
        url = f"/predict/{deployment_id}"
        token = settings.SERVEML_RUNTIME_TOKEN
        try:
            answers = [await call(runtime, "POST", url, b'{"data": [1]}') for _ in range(5)]
            answers += [await call(runtime, "POST", url, b'{"data": [1') for _ in range(2)]  # not JSON: 400
            answers.append(await call(runtime, "POST", url, b'{"kill": true}'))  # killed, twice: 502
            answers.append(await call(runtime, "POST", url, b'{"data": [2]}'))  # a fresh process answers
            refused = await call(runtime, "GET", "/metrics")
            wrong = await call(runtime, "GET", "/metrics", token="not-the-token")
            status, text = await call(runtime, "GET", "/metrics", token=token)
            _, figures = await call(runtime, "GET", f"/_figures/{deployment_id}", token=token)
            return answers, refused, wrong, status, text.decode(), orjson.loads(figures)
        finally:
            pool.close()

    answers, refused, wrong, status, text, figures = run(scenario())
    assert [code for code, _ in answers] == [200] * 5 + [400, 400, 502, 200]
    assert refused[0] == wrong[0] == 403  # it names every deployment on the host
    assert status == 200
    found = parse(text)
    deployment_id = "0f0e0d0c-0000-4000-8000-000000000000"
    version = labels(deployment_id, 1)
    assert found["serveml_requests_total", labels(deployment_id, 1, code="2xx")] == 6
    assert found["serveml_requests_total", labels(deployment_id, 1, code="4xx")] == 2
    assert found["serveml_requests_total", labels(deployment_id, 1, code="5xx")] == 1
    assert found["serveml_request_duration_seconds_count", version] == 9
    assert found["serveml_request_duration_seconds_bucket", labels(deployment_id, 1, le="+Inf")] == 9
    assert 0 < found["serveml_request_duration_seconds_sum", version] < 60
    assert found["serveml_requests_in_flight", version] == 0
    assert found["serveml_model_processes", version] == 1
    assert found["serveml_model_process_starts_total", version] >= 3  # the first, and one after each kill
    assert found["serveml_model_memory_bytes", version] > 5 * 1024**2  # an interpreter, at least
    # One request at a time, so frames of one: the two 400s never reached a model process, the killed
    # request went twice (5 + 2 + 1).
    assert found["serveml_batch_size_bucket", labels(deployment_id, 1, le="1")] == 8
    assert found["serveml_batch_size_count", version] == found["serveml_batch_size_sum", version] == 8
    assert found["serveml_version_serving", version] == 1
    assert abs(found["serveml_last_request_timestamp_seconds", version] - time.time()) < 60

    total = figures[deployment_id]["total"]
    assert total["requests"] == total["requests_per_minute"] == 9
    assert (total["errors_4xx"], total["errors_5xx"]) == (2, 1) and total["error_rate"] == pytest.approx(3 / 9)
    assert 0 < total["p50_seconds"] <= total["p95_seconds"] <= total["p99_seconds"] <= 60
    assert figures[deployment_id]["versions"]["1"]["serving"] is True


# Answers as the real handler does, by the rows it is sent (a list of records, "instances", or one
# "data" row); refuses (400) a request that asks it to.
ROWS_HANDLER = """
import json

def model():
    pass

def handle_many(bodies):
    answers = []
    for body in bodies:
        request = json.loads(body)
        if isinstance(request, list):
            request = {"instances": request}
        if request.get("refuse"):
            answers.append((400, b'{"error": "refused"}'))
        elif "data" in request:
            answers.append((200, b'{"prediction": 1, "model_type": "StandIn"}'))
        else:
            predictions = [1] * len(request["instances"])
            answers.append((200, json.dumps({"predictions": predictions, "model_type": "StandIn"}).encode()))
    return answers
"""


@pytest.mark.parametrize(
    "body, rows, refused",
    [
        (b'{"data": [5.1, 3.5, 1.4, 0.2]}', 1, None),
        (b'{"data": [[1, 2], [3, 4]], "method": "predict"}', 1, None),  # "data" is one row, as the handler reads it
        (b'{"instances": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]}', 3, None),
        (b'[{"a": 1}, {"a": 2}]', 2, None),  # records
        (b'{"instances": "not rows"}', 0, None),
        (b'"a string"', 0, None),
        (b'{"data": [1', 0, "request body is not valid JSON"),  # refused, no rows
        (b"[" * 33 + b"]" * 33, 0, "request body is nested deeper than 32 levels"),  # refused, no rows
    ],
)
def test_the_one_parse_of_a_prediction_body_also_counts_its_rows(body, rows, refused):
    from deployments.runtime.asgi import check_body

    problem, found = check_body(body)
    assert found == rows
    assert problem == refused if refused is None else problem.startswith(refused)


def test_the_runtime_counts_the_rows_of_answered_requests_json_and_v2_and_none_of_refused_ones(
    environment,  # noqa: F811
    tmp_path,
):
    from deployments.runtime.app import Runtime

    deployment_id = "0f0e0d0c-0000-4000-8000-0000000000a1"
    n = 7
    records = orjson.dumps([{"a": i, "b": i} for i in range(n)])
    tensor = {"inputs": [{"name": "input-0", "shape": [5, 4], "datatype": "FP64", "data": list(range(20))}]}
    bad_tensor = {"inputs": [{"name": "input-0", "shape": [2, 3], "datatype": "FP64", "data": list(range(6))}]}

    async def scenario():
        model = stand_in_build(tmp_path / "build", ROWS_HANDLER)
        signature = {"model_type": "StandIn", "n_features_in": 4, "classes": [0, 1], "methods": ["predict"]}
        spec = Spec(deployment_id, environment, tmp_path / "build", model, 2_000_996, signature)
        pool = ModelPool(spec, Access(), max_size=1)
        runtime = Runtime(max_processes=1)
        runtime.pools[deployment_id] = pool
        runtime.metrics.stats[deployment_id] = pool.stats = Stats(deployment_id, 1)  # what track() labels
        url, v2_url = f"/predict/{deployment_id}", f"/v2/models/{deployment_id}/infer"
        token = settings.SERVEML_RUNTIME_TOKEN
        try:
            answered = [
                await call(runtime, "POST", url, b'{"data": [1, 2, 3, 4]}'),  # 1
                await call(runtime, "POST", url, orjson.dumps({"instances": [[1, 2, 3, 4]] * 3})),  # 3
                await call(runtime, "POST", url, records),  # n
                await call(runtime, "POST", v2_url, orjson.dumps(tensor)),  # 5
            ]
            refused = [
                await call(runtime, "POST", url, orjson.dumps({"instances": [[1, 2, 3, 4]] * 9, "refuse": True})),
                await call(runtime, "POST", url, b'{"instances": [[1, 2, 3, 4]'),  # not JSON
                await call(runtime, "POST", v2_url, orjson.dumps(bad_tensor)),  # 3 features, not 4
            ]
            _, text = await call(runtime, "GET", "/metrics", token=token)
            _, figures = await call(runtime, "GET", f"/_figures/{deployment_id}", token=token)
            return answered, refused, text.decode(), orjson.loads(figures)
        finally:
            pool.close()

    answered, refused, text, figures = run(scenario())
    assert [code for code, _ in answered] == [200] * 4, answered
    assert orjson.loads(answered[3][1])["outputs"][0]["shape"][0] == 5
    assert [code for code, _ in refused] == [400] * 3, refused
    found = parse(text)
    expected = 1 + 3 + n + 5
    assert found["serveml_rows_total", labels(deployment_id, 1)] == expected
    assert found["serveml_requests_total", labels(deployment_id, 1, code="2xx")] == 4
    assert found["serveml_requests_total", labels(deployment_id, 1, code="4xx")] == 3
    entry = figures[deployment_id]
    assert entry["versions"]["1"]["rows"] == entry["versions"]["1"]["rows_per_minute"] == expected
    assert entry["total"]["rows"] == entry["total"]["rows_per_minute"] == expected


# ------------------------------------------------------------------ the page


@pytest.fixture
def ready(user, make_deployment):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    deployment.refresh_from_db()
    return deployment


@pytest.mark.django_db
def test_the_page_polls_its_figures_and_shows_unavailable_when_the_runtime_is_down(client, user, ready, settings):
    from tests.support.processes import free_port

    settings.SERVEML_RUNTIME_INTERNAL_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client.force_login(user)
    page = client.get(ready.get_absolute_url()).content.decode()
    figures_url = reverse("deployment-figures", args=[ready.public_id])
    assert f'hx-get="{figures_url}" hx-trigger="load, every 5s"' in page  # a slower poll than the status'

    fragment = client.get(figures_url)
    assert fragment.status_code == 200
    html = fragment.content.decode()
    assert "Figures unavailable" in html and 'hx-trigger="every 5s"' in html  # and it keeps asking

    listed = client.get(reverse("deployment-list"))
    assert listed.status_code == 200 and "req/min" not in listed.content.decode()  # no column, no error


@pytest.mark.django_db
def test_the_figures_of_a_stopped_deployment_stop_polling_and_aws_ones_point_to_cloudwatch(client, user, ready):
    client.force_login(user)
    figures_url = reverse("deployment-figures", args=[ready.public_id])
    Deployment.objects.filter(pk=ready.pk).update(status=Deployment.Status.STOPPED)
    html = client.get(figures_url).content.decode()
    assert "No live figures" in html and "hx-get" not in html

    Deployment.objects.filter(pk=ready.pk).update(status=Deployment.Status.READY, target=Deployment.Target.AWS)
    html = client.get(figures_url).content.decode()
    assert "Figures for aws deployments come from CloudWatch" in html and "hx-get" not in html


@pytest.mark.django_db
def test_the_page_shows_the_runtimes_figures_for_the_deployment_and_each_version(
    client, user, other_user, ready, monkeypatch
):
    from deployments import views

    now = time.time()
    version = {
        "requests": 42,
        "requests_per_minute": 12,
        "errors_4xx": 3,
        "errors_5xx": 0,
        "error_rate": 0.25,
        "p50_seconds": 0.0012,
        "p95_seconds": 0.004,
        "p99_seconds": 0.0051,
        "in_flight": 0,
        "processes": 1,
        "last_request": now - 5,
        "serving": True,
    }
    hour = [{"requests_per_second": 0, "errors": 0, "p99_seconds": None}] * 59
    hour.append({"requests_per_second": 0.2, "errors": 3, "p99_seconds": 0.0051})
    answer = {str(ready.public_id): {"total": version, "versions": {"1": version}, "last_hour": hour}}
    asked = []
    monkeypatch.setattr(views.client, "figures", lambda public_id=None, **kw: asked.append(public_id) or answer)
    client.force_login(user)
    html = client.get(reverse("deployment-figures", args=[ready.public_id])).content.decode()
    assert asked == [ready.public_id]
    assert 'id="figures-total" data-requests-per-minute="12" data-requests="42"' in html
    assert 'id="figures-v1"' in html and "serving" in html
    assert "25.0 %" in html and "(3 4xx, 0 5xx)" in html and "1.2 ms" in html and "5.1 ms" in html
    assert "ago" in html
    # The last hour, drawn on each poll: the last minute at the top of the requests/s line.
    assert 'id="chart-requests_per_second" data-now="0.2"' in html and "240.0,0.0" in html
    assert 'id="chart-p99_seconds" data-now="5.1"' in html and 'id="chart-errors" data-now="3"' in html
    hour[-1] = {"requests_per_second": 0.1, "errors": 0, "p99_seconds": 0.001}
    hour[-2] = {"requests_per_second": 0.2, "errors": 0, "p99_seconds": 0.001}
    html = client.get(reverse("deployment-figures", args=[ready.public_id])).content.decode()
    assert 'id="chart-requests_per_second" data-now="0.1"' in html and "240.0,20.0" in html  # the next poll, redrawn

    listed = client.get(reverse("deployment-list")).content.decode()
    assert "req/min" in listed and '<td class="rate">12</td>' in listed

    client.force_login(other_user)  # another user's deployment is a 404, figures too
    assert client.get(reverse("deployment-figures", args=[ready.public_id])).status_code == 404


# ------------------------------------------------------------------ end to end


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_deployments_requests_are_in_metrics_by_version_and_on_its_page(stack, live_server, client, user):
    from rest_framework.authtoken.models import Token
    from sklearn.linear_model import LogisticRegression

    from deployments.allowlist import corpus
    from tests.conftest import SKLEARN_PIN, dump, wait_for
    from tests.test_end_to_end import ROWS, deploy, model_pids, wait_ready

    token = Token.objects.create(user=user).key
    auth = {"Authorization": f"Token {token}"}
    root = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest(), name="counted"))
    url, deployment_id = root["endpoint_url"], root["id"]
    runtime_auth = {"Authorization": f"Bearer {settings.SERVEML_RUNTIME_TOKEN}"}

    def scrape() -> dict:
        answer = httpx.get(f"{stack.runtime_url}/metrics", headers=runtime_auth, timeout=10)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        return parse(answer.text)

    before = scrape()  # verify's own call is counted: count from here
    ok = [httpx.post(url, json={"data": ROWS[0].tolist()}, timeout=30) for _ in range(5)]
    handler_refused = [httpx.post(url, json={"data": [1.0, 2.0]}, timeout=30) for _ in range(2)]  # 2 features, not 4
    runtime_refused = httpx.post(url, content=b'{"data": [1', timeout=30)  # not JSON
    tensor = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0].tolist()}]}
    v2 = httpx.post(f"{stack.runtime_url}/v2/models/{deployment_id}/infer", json=tensor, timeout=30)
    assert [r.status_code for r in ok] == [200] * 5 and v2.status_code == 200, v2.text
    assert [r.status_code for r in [*handler_refused, runtime_refused]] == [400] * 3
    assert httpx.get(f"{stack.runtime_url}/metrics", timeout=10).status_code == 403

    found = scrape()

    def counted(version: int, code: str, scraped: dict, since: dict | None = None) -> float:
        key = ("serveml_requests_total", labels(deployment_id, version, code=code))
        return scraped.get(key, 0) - (since or {}).get(key, 0)

    assert counted(1, "2xx", found, before) == 6  # five, and the V2 request
    assert counted(1, "4xx", found, before) == 3
    assert counted(1, "5xx", found, before) == 0
    rows = ("serveml_rows_total", labels(deployment_id, 1))
    assert found[rows] - before.get(rows, 0) == 6  # a row each: the refused ones carry none
    assert found["serveml_model_processes", labels(deployment_id, 1)] >= 1

    # Version 2, promoted when ready: its answers under its own label, version 1's stay.
    model = LogisticRegression(max_iter=500).fit(*corpus.iris())
    uploaded = httpx.post(
        f"{live_server.url}/api/deployments/{deployment_id}/versions",
        headers=auth,
        files={"model_file": ("model.pkl", dump(model)), "requirements_file": ("requirements.txt", SKLEARN_PIN)},
        timeout=30,
    )
    assert uploaded.status_code == 202, uploaded.text

    wait_promoted(stack, f"{live_server.url}/api/deployments/{deployment_id}", auth)
    wait_for(
        lambda: scrape().get(("serveml_version_serving", labels(deployment_id, 2))) == 1, 30, "the runtime switched"
    )
    before_v2 = scrape()
    assert [httpx.post(url, json={"data": ROWS[0].tolist()}, timeout=30).status_code for _ in range(4)] == [200] * 4
    after = scrape()
    assert counted(2, "2xx", after, before_v2) == 4
    assert counted(1, "2xx", after, before_v2) == 0
    assert after["serveml_version_serving", labels(deployment_id, 1)] == 0
    # Version 1's processes stop once nothing routes to it (drain): the URL still routes to version 2.
    wait_for(lambda: not model_pids(deployment_id), 30, "version 1's model processes stopped")
    assert scrape()["serveml_version_serving", labels(deployment_id, 2)] == 1

    # The page's fragment, from the same runtime.
    client.force_login(user)
    html = client.get(reverse("deployment-figures", args=[deployment_id])).content.decode()
    assert 'id="figures-total"' in html and 'id="figures-v1"' in html and 'id="figures-v2"' in html
    assert "Figures unavailable" not in html
    figures = httpx.get(f"{stack.runtime_url}/_figures/{deployment_id}", headers=runtime_auth).json()[deployment_id]
    assert figures["versions"]["2"]["requests"] >= 4 and figures["versions"]["2"]["serving"]
    assert figures["total"]["requests"] == sum(v["requests"] for v in figures["versions"].values())
    assert f'data-requests="{figures["total"]["requests"]}"' in html
    assert f'data-rows="{figures["total"]["rows"]}"' in html and figures["total"]["rows"] >= 10
    assert len(figures["last_hour"]) == 60 and figures["last_hour"][-1]["requests_per_second"] > 0
    assert 'id="chart-requests_per_second"' in html


@pytest.mark.django_db
def test_the_admin_shows_a_deployments_totals_or_that_they_are_unavailable(admin_client, ready, monkeypatch, settings):
    from deployments import admin
    from tests.support.processes import free_port

    page = reverse("admin:deployments_deployment_change", args=[ready.pk])
    settings.SERVEML_RUNTIME_INTERNAL_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert "figures unavailable: the runtime did not answer" in admin_client.get(page).content.decode()

    figures = {"requests": 7, "requests_per_minute": 3, "error_rate": 0.5, "p99_seconds": 0.002}
    answer = {str(ready.public_id): {"total": figures, "versions": {"1": {**figures, "requests": 7}}}}
    monkeypatch.setattr(admin.client, "figures", lambda public_id=None, **kw: answer)
    html = admin_client.get(page).content.decode()
    assert "7 requests since the runtime started (v1: 7); last minute: 3 requests, error rate 50.0%, p99 2.0 ms" in html


def test_a_canarys_share_of_the_traffic_is_in_metrics_beside_the_serving_versions():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from deployments.runtime import app

    runtime = app.Runtime(max_processes=1)
    runtime.pools = {"v1": SimpleNamespace(processes=[]), "v2": SimpleNamespace(processes=[])}
    runtime.routes = {"deployment": "v1"}
    runtime.canaries = {"deployment": app.Canary("v2", 20)}
    runtime.metrics.stats = {"v1": Stats("deployment", 1), "v2": Stats("deployment", 2), "v3": Stats("deployment", 3)}
    found = parse(generate_latest(runtime.metrics.registry).decode())
    share = {n: found["serveml_version_traffic_percent", labels("deployment", n)] for n in (1, 2, 3)}
    assert share == {1: 80, 2: 20, 3: 0}
    assert runtime.metrics.figures("deployment")["deployment"]["versions"]["2"]["traffic_percent"] == 20


@pytest.mark.django_db
def test_the_page_shows_a_canarys_figures_beside_the_serving_versions(
    client,
    user,
    root,  # noqa: F811
    runtime,  # noqa: F811
    iris_rf_bytes,
    monkeypatch,
):
    from deployments import views

    v2 = ready_version(new_version(root, iris_rf_bytes))
    Deployment.objects.filter(pk=root.pk).update(canary=v2, canary_percent=20)
    figures = {"requests": 5, "requests_per_minute": 5, "errors_4xx": 0, "errors_5xx": 0, "error_rate": 0.0}
    figures |= {"p50_seconds": 0.001, "p95_seconds": 0.001, "p99_seconds": 0.001, "last_request": time.time()}
    answer = {str(root.public_id): {"total": figures, "versions": {"1": figures, "2": figures}}}
    monkeypatch.setattr(views.client, "figures", lambda public_id=None, **kw: answer)
    client.force_login(user)
    html = client.get(reverse("deployment-figures", args=[root.public_id])).content.decode()
    v1_row = html.split('id="figures-v1"')[1].split("</tr>")[0]
    v2_row = html.split('id="figures-v2"')[1].split("</tr>")[0]
    assert "canary 20%" in v2_row and "serving" not in v2_row
    assert "serving" in v1_row and "canary" not in v1_row
