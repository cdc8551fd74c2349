"""Array requests: the runtime decodes a plain numeric request once and hands a model process
its rows as float64 (deployments/runtime/protocol.py, serveml_handler._array_request), to
processes whose handler said it takes them. The answers must be the JSON path's, byte for byte,
errors included; anything that is not plain numbers still goes as JSON; a malformed frame is a
400, never a crash."""

import asyncio
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from deployments import buildkit
from deployments.runtime import protocol
from deployments.runtime.access import Access
from deployments.runtime.asgi import check_body, check_prediction, numeric_rows
from deployments.runtime.pool import ModelPool
from deployments.runtime.registry import Spec
from tests.test_pipeline import load_handler

ROW = [5.1, 3.5, 1.4, 0.2]
RNG = np.random.default_rng(14)
# Values whose float64 a parser could get wrong: long decimals, tiny and huge, -0.0, integers past 2**53.
AWKWARD = [[0.1 + 0.2, 1e-300, -0.0, 123456789.12345678], [2**60 + 1, 7, 5e-324, 1.7976931348623157e308]]
ROWS = [ROW, *np.round(RNG.normal(4, 2, size=(97, 4)), RNG.integers(0, 17)).tolist(), *AWKWARD]


def handler_module():
    return load_handler(buildkit.HERE)


def fitted(kind: str = "lr"):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from deployments.allowlist import corpus

    X, y = corpus.iris()
    if kind == "lr":
        return LogisticRegression(max_iter=500).fit(X, y)
    if kind == "named":
        import pandas as pd

        frame = pd.DataFrame(X, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
        return LogisticRegression(max_iter=500).fit(frame, y)
    texts = ["good great fine", "bad awful poor", "great good", "poor bad"]
    return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [1, 0, 1, 0])


def real_build(build: Path, model, handler_source: str | None = None) -> Path:
    """A build context as the package stage leaves it: ServeML's handler (or `handler_source`), its
    loader, serveml.json listing the globals the model file imports, the model; all read-only."""
    from deployments.inspection import scan_model_file

    data = pickle.dumps(model)
    scan = scan_model_file(io.BytesIO(data))
    build.mkdir()
    (build / "serveml_handler.py").write_text(handler_source or buildkit.HANDLER.read_text())
    shutil.copy(buildkit.LOADER, build / "serveml_loader.py")
    config = {
        "deployment_id": "0",
        "model_file": "model.pkl",
        "format": scan.format,
        "allowed_globals": sorted([g.module, g.name] for g in scan.globals),
        "example": None,
    }
    (build / "serveml.json").write_text(json.dumps(config))
    (build / "model.pkl").write_bytes(data)
    for path in build.iterdir():
        path.chmod(0o444)
    return build / "model.pkl"


@pytest.fixture(scope="module")
def environment():
    from deployments.environments import ensure_environment
    from deployments.requirements import parse_requirements
    from tests.conftest import SKLEARN_PIN

    return ensure_environment(parse_requirements(SKLEARN_PIN)).path


@pytest.fixture
def served(environment, tmp_path, monkeypatch):
    """A pool of one real sandboxed model process serving `model`, behind a Runtime; every body
    sent to a model process is recorded (`sent`)."""
    from deployments.runtime.app import Runtime

    sent = []
    encode = protocol.encode_requests

    def recording(bodies):
        sent.extend(bodies)
        return encode(bodies)

    monkeypatch.setattr(protocol, "encode_requests", recording)

    def make(model, handler_source: str | None = None) -> tuple[Runtime, ModelPool, list]:
        names = getattr(model, "feature_names_in_", None)
        signature = {
            "feature_names_in": None if names is None else [str(name) for name in names],
            "n_features_in": getattr(model, "n_features_in_", None),
        }
        model_path = real_build(tmp_path / f"build{len(list(tmp_path.iterdir()))}", model, handler_source)
        spec = Spec(
            "0f0e0d0c-0000-4000-8000-00000000a77a",
            environment,
            model_path.parent,
            model_path,
            2_000_998,
            signature=signature,
        )
        runtime = Runtime(max_processes=1)
        pool = runtime.pools[spec.deployment_id] = ModelPool(spec, Access(), max_size=1)
        return runtime, pool, sent

    return make


def run(coroutine, timeout=120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def post(runtime, pool, body: bytes) -> tuple[int, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": f"/predict/{pool.spec.deployment_id}", "method": "POST", "headers": []}
    await runtime(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


def both_ways(runtime, pool, bodies: list[bytes]) -> tuple[list, list]:
    """Each body's answer with array requests on, then with them off (JSON to the process)."""

    async def scenario():
        try:
            await pool.warm()
            assert pool.arrays
            arrays = [await post(runtime, pool, body) for body in bodies]
            pool.arrays = False
            return arrays, [await post(runtime, pool, body) for body in bodies]
        finally:
            pool.close()

    return run(scenario())


def dumps(value) -> bytes:
    return json.dumps(value).encode()


# ------------------------------------------------------------------ the gateway's decision


@pytest.mark.parametrize(
    "request_, rows",
    [
        ({"data": ROW}, 1),
        ({"data": [5, 3, 1, 0]}, 1),  # integers are numbers too
        ({"instances": [ROW] * 3}, 3),
        ({"instances": [ROW, [1, 2, 3.5, 4]], "method": "predict_proba"}, 2),
        ({"instances": [[1.5]]}, 1),
        ({"data": [2**64 - 1, -(2**63), 0.5, 1e308]}, 1),
    ],
)
def test_plain_numeric_requests_become_array_requests_of_the_same_float64_values(request_, rows):
    body = dumps(request_)
    problem, counted, frame = check_prediction(body, arrays=True)
    assert problem is None and counted == rows and frame.startswith(protocol.ARRAY_MAGIC)
    handler = handler_module()
    method, X, single = handler._array_request(handler.Model(AnyWidth()), frame)
    # What the JSON path makes of the same rows (serveml_handler._numeric), bit for bit.
    expected = np.asarray(request_.get("instances") or [request_["data"]], dtype=float)
    assert X.tobytes() == expected.tobytes() and X.shape == expected.shape
    assert X.flags.writeable and X.flags.c_contiguous and X.flags.aligned
    assert (method, single) == (request_.get("method", "predict"), "data" in request_)


class AnyWidth:
    """A model that takes rows of any width (no n_features_in_)."""

    def predict(self, X):
        return X[:, 0]

    predict_proba = decision_function = predict


@pytest.mark.parametrize(
    "request_",
    [
        {"data": [True, 1, 2, 3]},  # numpy would make 1.0 of it; JSON's path says what it makes
        {"instances": [[1, 2, 3, 4], [1, 2, 3, False]]},
        {"data": [None, 1, 2, 3]},  # null: a missing value, which forests take
        {"data": ["5.1", 3.5, 1.4, 0.2]},  # numeric strings
        {"instances": [{"a": 1}]},  # records
        {"instances": ["some text"]},
        {"instances": [[1, 2], [3]]},  # ragged
        {"instances": [[1, [2]]]},
        {"data": [[1, 2]]},
        {"data": []},
        {"instances": []},
        {"instances": [[]]},
        {"data": 5},
        {"data": ROW, "extra": 1},  # what the JSON path ignores, it keeps ignoring
        {"data": ROW, "instances": [ROW]},
        {"data": ROW, "method": None},
        {"data": ROW, "method": ["predict"]},
        {"data": ROW, "method": ""},
        {"data": ROW, "method": "x" * 300},
        {"data": ROW, "method": "\ud800"},
        [ROW, ROW],  # a bare list of rows
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]},  # V2's
    ],
)
def test_anything_else_goes_as_json(request_):
    body = json.dumps(request_).encode()
    assert numeric_rows(json.loads(body), body) is None
    problem, _, frame = check_prediction(body, arrays=True)
    assert frame is None and (problem is None or "surrogate" in problem)  # orjson refuses a lone surrogate


def test_without_arrays_and_for_bad_bodies_the_check_is_the_one_it_was():
    body = dumps({"data": ROW})
    assert check_prediction(body, arrays=False) == (None, 1, None)
    assert check_body(body) == (None, 1)
    deep = b"[" * 40 + b"]" * 40
    assert check_prediction(deep, arrays=True)[0] == "request body is nested deeper than 32 levels"
    assert check_prediction(b"\x00SVA", arrays=True)[0].startswith("request body is not valid JSON")


def test_the_runtime_and_the_handler_read_the_same_layout():
    handler = handler_module()
    assert handler.ARRAY_REQUESTS == 1 and protocol.READY_ARRAYS.endswith(b"arrays=1")
    assert (handler.ARRAY_MAGIC, handler.ARRAY_HEADER.format, handler.ARRAY_SINGLE) == (
        protocol.ARRAY_MAGIC,
        protocol.ARRAY_HEADER.format,
        protocol.ARRAY_SINGLE,
    )
    frame = protocol.encode_array("predict_proba", False, np.arange(8.0).reshape(2, 4))
    method, X, single = handler._array_request(handler.Model(fitted()), frame)
    assert (method, single, X.tolist()) == ("predict_proba", False, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert (
        len(protocol.ARRAY_MAGIC) + 12 == protocol.ARRAY_HEADER.size
        and frame[protocol.ARRAY_HEADER.size :][:16] == b"predict_proba\x00\x00\x00"
    )


def frame(rows=1, columns=4, *, method=b"", flags=0, values=None, magic=protocol.ARRAY_MAGIC) -> bytes:
    data = np.zeros(rows * columns).tobytes() if values is None else values
    header = protocol.ARRAY_HEADER.pack(magic, flags, len(method), rows, columns)
    return header + method + bytes(-len(method) % 8) + data


MALFORMED = [
    (b"\x00SV", "3 bytes, shorter than its header"),
    (frame(values=b"\x00" * 31), "1 x 4 float64 values are 32 bytes, it holds 31"),
    (frame(values=b"\x00" * 33), "1 x 4 float64 values are 32 bytes, it holds 33"),
    (frame(2**32 - 1, 2**32 - 1, values=bytes(32)), "4294967295 x 4294967295 float64 values are"),  # no allocation
    (frame(0, 4, values=b""), "a shape of 0 x 4"),
    (frame(2, 4, flags=protocol.ARRAY_SINGLE), "a shape of 2 x 4"),
    (frame(flags=6), "unknown magic or flags"),
    (frame(magic=b"\x00SVZ"), "unknown magic or flags"),
    (frame(method=b"\xff\xfe"), "its method is not UTF-8"),
    (frame(method=b"x" * 40, values=b""), "1 x 4 float64 values are 32 bytes, it holds 0"),
]


@pytest.mark.parametrize("body, says", MALFORMED)
def test_the_handler_trusts_nothing_in_an_array_requests_header(body, says):
    handler = handler_module()
    with pytest.raises(handler.BadRequest) as refused:
        handler._array_request(handler.Model(fitted()), body)
    assert "malformed array request" in str(refused.value) and says in str(refused.value)


def test_lambda_takes_json_only():
    handler = handler_module()
    status, answer = handler.handle(protocol.encode_array(None, True, np.zeros((1, 4))))
    assert status == 400 and json.loads(answer)["error"].startswith("request body is not valid JSON")


# ------------------------------------------------------------------ real model processes


def test_array_requests_and_json_get_byte_identical_answers_and_errors(served):
    runtime, pool, sent = served(fitted())
    bodies = [
        dumps({"data": ROW}),
        dumps({"instances": ROWS}),
        dumps({"instances": ROWS, "method": "predict_proba"}),
        dumps({"data": [5, 3, 1, 0], "method": "decision_function"}),
        dumps({"instances": AWKWARD, "method": "predict_proba"}),
        dumps({"data": [1e308, 1e308, 1e308, -1e308], "method": "predict_proba"}),  # overflows inside the model
        # errors: the handler's own words, whichever way the rows came
        dumps({"data": [1, 2, 3]}),
        dumps({"instances": [[1, 2, 3], [4, 5, 6]]}),
        dumps({"data": ROW, "method": "transform"}),
        dumps({"instances": [ROW], "method": "predict_log_proba"}),
    ]
    arrays, as_json = both_ways(runtime, pool, bodies)
    assert arrays == as_json
    frames = [body for body in sent if body.startswith(protocol.ARRAY_MAGIC)]
    assert len(frames) == len(bodies)  # every one of them went as an array request
    assert [status for status, _ in arrays] == [200] * 6 + [400] * 4
    errors = [json.loads(answer)["error"] for _, answer in arrays[6:9]]
    assert errors[:2] == ["expected 4 features per row, got 3"] * 2
    assert errors[2].startswith("method 'transform' is not available for LogisticRegression; use one of: predict")
    proba = json.loads(arrays[2][1])["predictions"]
    assert np.allclose(proba, fitted().predict_proba(np.asarray(ROWS)), rtol=0, atol=1e-12, equal_nan=True)


def test_a_nan_in_an_array_request_is_what_a_null_is_in_json(served):
    """The gateway never makes NaN (JSON has none, and rows with null go as JSON); a frame that holds
    one is answered as the same row with null: the model decides (forests take it, this one refuses)."""
    runtime, pool, sent = served(fitted())

    async def scenario():
        try:
            await pool.warm()
            values = np.array([[np.nan, 3.5, 1.4, 0.2]]).tobytes()
            nan = await pool.predict(b"{}", frame(values=values, flags=protocol.ARRAY_SINGLE))
            null = await post(runtime, pool, dumps({"data": [None, 3.5, 1.4, 0.2]}))
            return nan, null
        finally:
            pool.close()

    nan, null = run(scenario())
    assert nan == null and nan[0] == 400 and b"NaN" in nan[1]
    assert not sent[-1].startswith(protocol.ARRAY_MAGIC)  # the null went as JSON


def test_a_malformed_array_request_answers_400_and_the_process_keeps_serving(served):
    runtime, pool, _ = served(fitted())

    async def scenario():
        try:
            await pool.warm()
            pid = pool.processes[0].pid
            # Those that do not start with the magic are no array requests: JSON, which they are not.
            refused = [await pool.predict(b"{}", body) for body, _ in MALFORMED]
            after = await post(runtime, pool, dumps({"data": ROW}))
            return refused, after, pool.processes[0].pid == pid
        finally:
            pool.close()

    refused, after, same_process = run(scenario())
    for (status, answer), (body, says) in zip(refused, MALFORMED, strict=True):
        error = json.loads(answer)["error"]
        if body.startswith(protocol.ARRAY_MAGIC):
            assert status == 400 and says in error
        else:
            assert status == 400 and error.startswith("request body is not valid JSON")
    assert after == (200, b'{"prediction":0,"model_type":"LogisticRegression"}') and same_process


def test_array_and_json_requests_waiting_together_share_one_frame_and_keep_their_own_answers(served):
    runtime, pool, sent = served(fitted())
    bodies = (
        [
            dumps({"data": ROW}),
            dumps({"instances": ROWS[:10], "method": "predict_proba"}),
            dumps({"data": [1, 2, 3]}),
            dumps({"data": [None, 1, 2, 3]}),
            dumps({"instances": ROWS[10:30]}),
            dumps({"data": ["5.1", "3.5", "1.4", "0.2"]}),  # JSON: numeric strings
            dumps({"instances": ROWS[30:33], "method": "decision_function"}),
        ]
        * 5
    )

    async def scenario():
        try:
            await pool.warm()
            alone = [await post(runtime, pool, body) for body in bodies[:7]]
            together = await asyncio.gather(*(post(runtime, pool, body) for body in bodies))
            return alone, together
        finally:
            pool.close()

    alone, together = run(scenario())
    assert together == alone * 5
    assert any(body.startswith(protocol.ARRAY_MAGIC) for body in sent) and any(body.startswith(b"{") for body in sent)


def test_a_handler_from_before_array_requests_is_sent_json(served):
    """Older build contexts hold a handler without ARRAY_REQUESTS: model_server.py (always ServeML's
    current one) says so in its ready frame, and the runtime sends that process JSON only."""
    source = buildkit.HANDLER.read_text().replace("ARRAY_REQUESTS = 1\n", "")
    runtime, pool, sent = served(fitted(), source)

    async def scenario():
        try:
            await pool.warm()
            return pool.processes[0].arrays, pool.arrays, await post(runtime, pool, dumps({"instances": [ROW] * 3}))
        finally:
            pool.close()

    process_arrays, pool_arrays, answer = run(scenario())
    assert (process_arrays, pool_arrays) == (False, False)
    assert answer == (200, b'{"predictions":[0,0,0],"model_type":"LogisticRegression"}')
    assert sent == [dumps({"instances": [ROW] * 3})]


def test_records_and_texts_still_go_as_json_and_are_answered(served):
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    runtime, pool, sent = served(fitted("named"))
    record = dict(zip(names, ROW, strict=True))

    async def named():
        try:
            await pool.warm()
            assert pool.processes[0].arrays and not pool.arrays  # feature names: rows become a DataFrame
            return [await post(runtime, pool, dumps(body)) for body in ({"instances": [record]}, {"data": ROW})]
        finally:
            pool.close()

    assert run(named()) == [
        (200, b'{"predictions":[0],"model_type":"LogisticRegression"}'),
        (200, b'{"prediction":0,"model_type":"LogisticRegression"}'),
    ]
    assert not any(body.startswith(protocol.ARRAY_MAGIC) for body in sent)

    sent.clear()
    runtime, pool, _ = served(fitted("text"))

    async def texts():
        try:
            await pool.warm()
            return await post(runtime, pool, dumps({"instances": ["good great", "awful bad"]}))
        finally:
            pool.close()

    assert run(texts()) == (200, b'{"predictions":[1,0],"model_type":"Pipeline"}')
    assert not any(body.startswith(protocol.ARRAY_MAGIC) for body in sent)
