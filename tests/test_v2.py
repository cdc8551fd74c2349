"""The Open Inference Protocol (V2 REST): the shared translation, the Lambda handler called
with API Gateway events, and tritonclient's own InferenceServerClient against a real runtime
serving real deployments, answering what the JSON endpoint answers."""

import base64
import gzip
import json
import uuid

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from deployments.allowlist import corpus
from deployments.buildkit import serveml_v2
from deployments.buildkit.serveml_v2 import V2Error
from tests.conftest import PANDAS_PIN, dump

X_IRIS, _ = corpus.iris()
ROWS = X_IRIS[::15]
IRIS = serveml_v2.describe(
    {"model_type": "RandomForestClassifier", "n_features_in": 4, "classes": [0, 1, 2], "methods": ["predict"]}
)


FRAME = serveml_v2.describe(
    {"model_type": "Pipeline", "feature_names_in": ["sepal", "city"], "classes": ["a", "b"], "methods": ["predict"]},
    {"sepal": 1.0, "city": "lyon"},
)
TEXT = serveml_v2.describe({"model_type": "Pipeline", "classes": [0, 1], "methods": ["predict", "decision_function"]})


def parsed(request: dict, header_length=None, binary=b""):
    body = json.dumps(request).encode()
    return serveml_v2.parse(body + binary, len(body) if binary else header_length, json.loads)


def tensor(data, shape, datatype="FP64", name="input-0"):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


# ------------------------------------------------------------------ translation


def test_a_row_shaped_request_becomes_rows_flat_or_nested():
    flat = parsed(tensor([1, 2, 3, 4, 5, 6, 7, 8], [2, 4]))
    nested = parsed(tensor([[1, 2, 3, 4], [5, 6, 7, 8]], [2, 4]))
    assert (
        serveml_v2.plan(flat, IRIS)
        == serveml_v2.plan(nested, IRIS)
        == ([[1, 2, 3, 4], [5, 6, 7, 8]], [("predict", False)])
    )


@pytest.mark.parametrize(
    "request_, message",
    [
        (tensor([1, 2, 3], [1, 3]), "expected 4 features per row, got 3"),
        (tensor([1, 2, 3, 4], [4]), "send [N, 4], one row of 4 features per prediction"),
        (tensor([1, 2, 3, 4], [1, 4], "FP128"), "has datatype 'FP128'"),
        (tensor([1, 2, 3], [1, 4]), "holds 4 values, but its data has 3"),
        (tensor(["a", "b", "c", "d"], [1, 4], "BYTES"), "takes numbers"),
        (tensor([1.5, 2, 3, 4], [1, 4], "INT64"), "must be whole numbers"),
        (tensor([300, 2, 3, 4], [1, 4], "INT8"), "between -128 and 127"),
        (tensor([True, 2, 3, 4], [1, 4]), "must be numbers"),
        (tensor([1, 2, 3, 4], [1, -4]), "needs a shape"),
        (tensor([1, 2, 3, 4], [1, 1, 4]), "send [N, F] rows"),
        (tensor([[[1], [2]], [[3], [4]]], [2, 2]), "nested deeper than its shape"),
        (tensor([[1, 2], 3, 4], [2, 2]), "data mixes lists and values"),
        (tensor([1] * 4, [10**9, 10**9]), "more than 1000000 values"),
        ({**tensor([1, 2, 3, 4], [1, 4]), "parameters": {"temperature": 1}}, "unknown parameters in the request"),
        ({**tensor([1, 2, 3, 4], [1, 4]), "parameters": {"method": "predict_proba"}}, "not available"),
        ({**tensor([1, 2, 3, 4], [1, 4]), "outputs": [{"name": "transform"}]}, "has no output 'transform'"),
        ({"inputs": []}, '"inputs" must be a non-empty list'),
        ([1, 2], "a JSON object"),
        ({**tensor([1, 2, 3, 4], [1, 4]), "id": 7}, '"id" must be a string'),
    ],
)
def test_bad_tensors_are_refused_with_a_message_for_people(request_, message):
    with pytest.raises(V2Error, match=None) as refused:
        serveml_v2.plan(parsed(request_), IRIS)
    assert refused.value.status == 400 and message in refused.value.message


def test_model_metadata_comes_from_the_signature_and_the_validated_example():
    signature = {
        "model_type": "Pipeline",
        "feature_names_in": ["age", "city"],
        "classes": ["no", "yes"],
        "methods": ["predict", "predict_proba", "decision_function"],
    }
    metadata = serveml_v2.model_metadata("d", serveml_v2.describe(signature, {"age": 0.0, "city": "lyon"}))
    assert metadata["inputs"] == [
        {"name": "age", "datatype": "FP64", "shape": [-1]},
        {"name": "city", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "predict", "datatype": "BYTES", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]},
        {"name": "decision_function", "datatype": "FP64", "shape": [-1]},
    ]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("d", ["1"], "sklearn")


def test_binary_tensors_are_decoded_and_their_sizes_checked():
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    spec = {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}
    rows, _ = serveml_v2.plan(parsed({"inputs": [spec]}, binary=data.tobytes()), IRIS)
    assert rows == data.tolist()
    with pytest.raises(V2Error, match="32 bytes of binary data"):
        parsed(
            {"inputs": [{**spec, "parameters": {"binary_data_size": 32}, "datatype": "FP64"}]}, binary=data.tobytes()
        )
    with pytest.raises(V2Error, match="announces 40 bytes"):
        parsed({"inputs": [{**spec, "parameters": {"binary_data_size": 40}}]}, binary=data.tobytes())
    with pytest.raises(V2Error, match="Inference-Header-Content-Length"):
        serveml_v2.parse(json.dumps({"inputs": [spec]}).encode() + data.tobytes(), None, json.loads)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
SPEC = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input-0", "sepal", "", 3]),
        "shape": st.lists(st.integers(-1, 5), max_size=3) | JSON,
        "datatype": st.sampled_from([*serveml_v2.DATATYPES, "FP8", 1]),
        "data": JSON,
    },
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "content_type", "x"]), JSON)},
)
REQUEST = st.fixed_dictionaries(
    {"inputs": st.lists(SPEC, max_size=3) | JSON},
    optional={"id": JSON, "parameters": JSON, "outputs": JSON},
)


@given(request_=REQUEST | JSON, binary=st.binary(max_size=16))
@settings(max_examples=300, deadline=None)
def test_whatever_a_client_sends_is_answered_or_refused_with_a_v2_error(request_, binary):
    for model in (IRIS, FRAME, TEXT):
        try:
            rows, outputs = serveml_v2.plan(parsed(request_, binary=binary), model)
        except V2Error as exc:
            assert exc.status in (400, 413) and exc.message
        else:
            assert rows and outputs


def test_a_gzip_bomb_is_refused_as_too_large():
    bomb = gzip.compress(b" " * (serveml_v2.MAX_BODY + 10))
    with pytest.raises(V2Error) as refused:
        serveml_v2.decompress(bomb, "gzip")
    assert refused.value.status == 413


def test_versions_other_than_1_answer_a_clear_404():
    some = str(uuid.uuid4())
    assert serveml_v2.route("POST", f"/v2/models/{some}/versions/1/infer") == ("infer", some)
    with pytest.raises(V2Error, match="one version for now") as missing:
        serveml_v2.route("POST", f"/v2/models/{some}/versions/2/infer")
    assert missing.value.status == 404
    with pytest.raises(V2Error) as wrong_method:
        serveml_v2.route("GET", f"/v2/models/{some}/infer")
    assert wrong_method.value.status == 405


# ------------------------------------------------------------------ the Lambda handler


def gateway_event(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> dict:
    """An API Gateway HTTP API (payload 2.0) event, as the V2 routes deliver it."""
    return {
        "version": "2.0",
        "routeKey": f"{method} /v2/{{proxy+}}",
        "rawPath": path,
        "headers": {"content-type": "application/json", **(headers or {})},
        "requestContext": {"http": {"method": method, "path": path}},
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


def answer_of(reply: dict) -> triton.InferResult:
    body = base64.b64decode(reply["body"]) if reply.get("isBase64Encoded") else reply["body"].encode()
    return triton.InferenceServerClient.parse_response_body(
        body, header_length=reply["headers"].get("Inference-Header-Content-Length")
    )


@pytest.fixture
def lambda_iris(user, make_deployment):
    from tests.test_pipeline import packaged

    deployment = make_deployment(user)
    return packaged(deployment), str(deployment.public_id)


def test_the_lambda_handler_answers_v2_health_metadata_and_inference(lambda_iris, iris_rf):
    handler, deployment_id = lambda_iris
    call = handler.lambda_handler
    assert call(gateway_event("GET", "/v2/health/live"), None)["statusCode"] == 200
    assert json.loads(call(gateway_event("GET", "/v2"), None)["body"])["extensions"] == ["binary_tensor_data"]
    assert call(gateway_event("GET", f"/v2/models/{deployment_id}/ready"), None)["statusCode"] == 200
    assert call(gateway_event("GET", f"/v2/models/{uuid.uuid4()}/ready"), None)["statusCode"] == 404
    metadata = json.loads(call(gateway_event("GET", f"/v2/models/{deployment_id}"), None)["body"])
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]} in metadata["outputs"]

    # What tritonclient itself sends: binary FP32 tensors after the JSON header.
    features = triton.InferInput("input-0", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS.astype(np.float32))
    outputs = [triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba", binary_data=False)]
    body, json_size = triton.InferenceServerClient.generate_request_body([features], outputs, request_id="r-1")
    reply = call(
        gateway_event(
            "POST", f"/v2/models/{deployment_id}/infer", body, {"Inference-Header-Content-Length": str(json_size)}
        ),
        None,
    )
    assert reply["statusCode"] == 200, reply["body"]
    result = answer_of(reply)
    assert result.get_response()["id"] == "r-1"
    X = ROWS.astype(np.float32)
    assert result.as_numpy("predict").tolist() == iris_rf.predict(X).tolist()
    np.testing.assert_allclose(result.as_numpy("predict_proba"), iris_rf.predict_proba(X))

    bad = call(
        gateway_event("POST", f"/v2/models/{deployment_id}/infer", json.dumps(tensor([1, 2, 3], [1, 3])).encode()), None
    )
    assert bad["statusCode"] == 400 and json.loads(bad["body"]) == {
        "error": "input 'input-0' has shape [1, 3]: expected 4 features per row, got 3"
    }


def test_the_lambda_handler_takes_one_input_per_column_for_a_dataframe_model(user, make_deployment):
    from tests.test_pipeline import packaged

    model = corpus.column_transformer()
    deployment = make_deployment(user, dump(model), PANDAS_PIN)
    handler = packaged(deployment)
    frame = corpus.mixed_frame()[0].iloc[:5]
    inputs = []
    for column in frame.columns:
        values = frame[column].to_numpy()
        datatype = "BYTES" if column == "city" else "FP64"
        spec = triton.InferInput(column, [len(frame)], datatype)
        spec.set_data_from_numpy(values.astype(object) if datatype == "BYTES" else values.astype(np.float64))
        inputs.append(spec)
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, parameters={"method": "predict_proba"})
    reply = handler.lambda_handler(
        gateway_event(
            "POST",
            f"/v2/models/{deployment.public_id}/infer",
            body,
            {"Inference-Header-Content-Length": str(json_size)},
        ),
        None,
    )
    assert reply["statusCode"] == 200, reply["body"]
    np.testing.assert_allclose(answer_of(reply).as_numpy("predict_proba"), model.predict_proba(frame))


def test_a_private_function_refuses_v2_calls_without_a_key_but_says_it_is_live(user, make_deployment, monkeypatch):
    from tests.test_pipeline import packaged

    deployment = make_deployment(user)
    handler = packaged(deployment)
    monkeypatch.setenv("SERVEML_PRIVATE", "1")
    monkeypatch.setenv("SERVEML_KEY_SHA256", "0" * 64)
    assert handler.lambda_handler(gateway_event("GET", "/v2/health/ready"), None)["statusCode"] == 200
    refused = handler.lambda_handler(gateway_event("GET", f"/v2/models/{deployment.public_id}"), None)
    assert refused["statusCode"] == 401 and "API keys" in json.loads(refused["body"])["error"]


# ------------------------------------------------------------------ tritonclient against the runtime


@pytest.fixture
def token(user):
    from rest_framework.authtoken.models import Token

    return Token.objects.create(user=user).key


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_tritonclient_gets_the_same_answers_as_the_json_endpoint(stack, live_server, token):
    from tests.test_end_to_end import deploy, wait_ready

    forest, frame_forest = corpus.random_forest(), corpus.frame_random_forest()
    uploads = [deploy(live_server, token, forest, name="forest")]
    uploads.append(deploy(live_server, token, frame_forest, requirements=PANDAS_PIN, name="frame"))
    state = wait_ready(stack, token, uploads[0])
    url, name = state["endpoint_url"], state["id"]
    client = triton.InferenceServerClient(stack.runtime_url.removeprefix("http://"))

    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready(name) and client.is_model_ready(name, model_version="1")
    assert not client.is_model_ready(str(uuid.uuid4()))
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["platform"] == "sklearn"
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert [output["name"] for output in metadata["outputs"]] == ["predict", "predict_proba"]

    expected = httpx.post(url, json={"instances": ROWS.tolist()}).json()["predictions"]
    expected_proba = httpx.post(url, json={"instances": ROWS.tolist(), "method": "predict_proba"}).json()["predictions"]

    # FP64, binary both ways (tritonclient's default), both outputs, the id echoed.
    features = triton.InferInput("input-0", list(ROWS.shape), "FP64").set_data_from_numpy(ROWS)
    result = client.infer(
        name,
        [features],
        outputs=[triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba")],
        request_id="batch-7",
    )
    assert result.get_response()["id"] == "batch-7"
    assert result.as_numpy("predict").tolist() == expected
    assert result.as_numpy("predict_proba").tolist() == expected_proba

    # FP32 in JSON, the method as a parameter, version 1 named, the request gzipped.
    rows32 = ROWS.astype(np.float32)
    features = triton.InferInput("input-0", list(ROWS.shape), "FP32").set_data_from_numpy(rows32, binary_data=False)
    result = client.infer(
        name,
        [features],
        model_version="1",
        outputs=[triton.InferRequestedOutput("predict_proba", binary_data=False)],
        request_compression_algorithm="gzip",
    )
    answer = httpx.post(url, json={"instances": rows32.tolist(), "method": "predict_proba"}).json()
    assert result.as_numpy("predict_proba").tolist() == answer["predictions"]
    proba = client.infer(name, [features], parameters={"method": "predict_proba"})  # no outputs: binary answer
    assert proba.as_numpy("predict_proba").tolist() == answer["predictions"]

    # INT64.
    whole = np.rint(ROWS).astype(np.int64)
    features = triton.InferInput("input-0", list(whole.shape), "INT64").set_data_from_numpy(whole)
    answer = httpx.post(url, json={"instances": whole.tolist()}).json()["predictions"]
    assert client.infer(name, [features]).as_numpy("predict").tolist() == answer

    # Bad tensors: 400 with a message, never a 500.
    def refused(inputs, **kwargs):
        with pytest.raises(InferenceServerException) as failed:
            client.infer(name, inputs, **kwargs)
        return failed.value

    short = triton.InferInput("input-0", [2, 3], "FP64").set_data_from_numpy(ROWS[:2, :3])
    error = refused([short])
    assert error.status() == "400" and "expected 4 features per row, got 3" in error.message()
    texts = triton.InferInput("input-0", [1, 4], "BYTES").set_data_from_numpy(
        np.array([["a", "b", "c", "d"]], dtype=object)
    )
    assert "takes numbers" in refused([texts]).message()
    error = refused(
        [triton.InferInput("input-0", [2, 4], "FP64").set_data_from_numpy(ROWS[:2])], parameters={"temperature": 2}
    )
    assert error.status() == "400" and "unknown parameters" in error.message()
    v2_url = f"{stack.runtime_url}/v2/models/{name}/infer"
    lying = httpx.post(v2_url, json=tensor(ROWS[0].tolist(), [2, 4]))
    assert lying.status_code == 400 and "holds 8 values, but its data has 4" in lying.json()["error"]
    assert httpx.post(f"{stack.runtime_url}/v2/models/{name}/versions/2/infer", json={}).status_code == 404
    assert httpx.post(v2_url, content=b"{" * 100_000).status_code == 400
    too_big = httpx.post(v2_url, content=b" " * (11 * 1024 * 1024))
    assert too_big.status_code == 413

    # A DataFrame model: one input per column, as MLServer's pandas codec sends them.
    frame_state = wait_ready(stack, token, uploads[1])
    frame = corpus.iris_frame()[0].iloc[::15]
    columns = [
        triton.InferInput(column, [len(frame)], "FP64").set_data_from_numpy(frame[column].to_numpy())
        for column in frame.columns
    ]
    records = httpx.post(frame_state["endpoint_url"], json={"instances": frame.to_dict(orient="records")}).json()
    assert client.infer(frame_state["id"], columns).as_numpy("predict").tolist() == records["predictions"]
    with pytest.raises(InferenceServerException, match="missing inputs for features"):
        client.infer(frame_state["id"], columns[:3])

    # A private endpoint: the same keys as the JSON endpoint.
    auth = {"Authorization": f"Token {token}"}
    key = httpx.post(f"{state['status_url']}/keys", headers=auth, json={"name": "v2"}).json()["key"]
    rows = triton.InferInput("input-0", list(ROWS.shape), "FP64").set_data_from_numpy(ROWS)
    with pytest.raises(InferenceServerException) as locked:
        client.infer(name, [rows])
    assert locked.value.status() == "401"
    assert not client.is_model_ready(name)
    keyed = client.infer(name, [rows], headers={"Authorization": f"Bearer {key}"})
    assert keyed.as_numpy("predict").tolist() == expected


# ------------------------------------------------------------------ the runtime's errors and batching

STAND_IN = """
import os, time

def model():
    pass

def handle_many(bodies):
    answers = []
    for body in bodies:
        if b"crash" in body:
            os._exit(7)
        if b"hang" in body:
            time.sleep(60)
        answers.append((200, b'{"predictions": [%d], "model_type": "StandIn"}' % len(bodies)))
    return answers
"""
STAND_IN_ID = "0f0e0d0c-0000-4000-8000-00000000000a"


@pytest.fixture
def stand_in_runtime(tmp_path):
    """A runtime serving a text model whose stand-in handler (a real sandboxed model process) crashes,
    hangs, or answers how many requests shared its frame."""
    from deployments.environments import ensure_environment
    from deployments.requirements import parse_requirements
    from deployments.runtime.access import Access
    from deployments.runtime.app import Runtime
    from deployments.runtime.pool import ModelPool
    from deployments.runtime.registry import Spec
    from tests.conftest import SKLEARN_PIN, stand_in_build

    build = tmp_path / "build"
    model = stand_in_build(build, STAND_IN, "m.pkl")
    environment = ensure_environment(parse_requirements(SKLEARN_PIN)).path
    signature = {"model_type": "StandIn", "classes": [0, 1], "methods": ["predict"]}
    spec = Spec(STAND_IN_ID, environment, build, model, 2_000_998, signature)

    def make(access=None):
        runtime = Runtime(max_processes=1)
        runtime.pools[STAND_IN_ID] = ModelPool(spec, access or Access(), max_size=1)
        return runtime

    return make


async def asgi(app, method, path, body=b"", headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": list(headers)}, receive, send)
    start, reply = sent
    return start["status"], reply["body"]


def texts(*values):
    return json.dumps(tensor(list(values), [len(values)], "BYTES")).encode()


@pytest.mark.parametrize(
    "text, status, says", [("hang", 504, "longer than 1 s"), ("crash", 502, "crashed while answering")]
)
def test_v2_answers_the_json_endpoints_502_and_504(stand_in_runtime, settings, text, status, says):
    import asyncio

    settings.SERVEML_PREDICT_TIMEOUT_S = 1
    runtime = stand_in_runtime()
    url = f"/v2/models/{STAND_IN_ID}/infer"

    async def scenario():
        try:
            return await asgi(runtime, "POST", url, texts(text)), await asgi(runtime, "POST", url, texts("fine"))
        finally:
            runtime.unload(STAND_IN_ID)

    (failed, error), (after, _) = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert failed == status and says in json.loads(error)["error"]
    assert after == 200


def test_v2_requests_share_the_model_process_frames_like_json_ones(stand_in_runtime):
    import asyncio

    runtime = stand_in_runtime()
    url = f"/v2/models/{STAND_IN_ID}/infer"

    async def scenario():
        try:
            await runtime.pools[STAND_IN_ID].warm()
            return await asyncio.gather(*(asgi(runtime, "POST", url, texts(f"row {n}")) for n in range(30)))
        finally:
            runtime.unload(STAND_IN_ID)

    answers = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert {status for status, _ in answers} == {200}
    shared = [json.loads(body)["outputs"][0]["data"][0] for _, body in answers]
    assert max(shared) > 1  # they arrived together, so the process took them in one frame


def test_v2_answers_the_json_endpoints_401_and_413(stand_in_runtime):
    import asyncio

    from deployments.runtime.access import Access

    runtime = stand_in_runtime(Access(private=True, key_digests=frozenset({b"0" * 64})))
    url = f"/v2/models/{STAND_IN_ID}"

    async def scenario():
        try:
            return (
                await asgi(runtime, "GET", url),
                await asgi(runtime, "GET", f"{url}/ready", headers=[(b"authorization", b"Bearer wrong")]),
                await asgi(runtime, "POST", f"{url}/infer", b" " * (11 * 1024 * 1024)),
                await asgi(runtime, "GET", "/v2/health/ready"),
            )
        finally:
            runtime.unload(STAND_IN_ID)

    (metadata, error), (ready, _), (large, _), (server, _) = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert metadata == 401 and "API keys" in json.loads(error)["error"]
    assert (ready, large, server) == (401, 413, 200)
