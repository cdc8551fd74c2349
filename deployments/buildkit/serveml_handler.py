"""The prediction handler: ServeML's prediction contract, as plain Python.

The same module runs in the AWS Lambda image (`lambda_handler`, for API Gateway
REST and HTTP API proxy events) and in ServeML's local runtime (`handle_many`,
fed by model_server.py). It reads `serveml.json`, which the package stage
writes next to it (model file, format, the globals the model may import), and
loads the model with the restricted loader. Request and response JSON:

    {"data": [5.1, 3.5, 1.4, 0.2]}        -> {"prediction": 0, "model_type": "..."}
    {"instances": [[...], [...]]}          -> {"predictions": [...], "model_type": "..."}
    {"instances": [{"feature": 1.0}, ...]} -> records, for models fitted on a DataFrame
    "method": "predict" | "predict_proba" | "decision_function"

The Lambda handler also answers the Open Inference Protocol (V2) at /v2/..., translated
by serveml_v2.py beside it onto the same `predict` (the local runtime translates it itself).
Bad input answers 400 with a message; this handler never answers 500 for input.
It runs in the model's own environment: the stdlib, the model's requirements,
and serveml_loader.py beside it.

In the local runtime, a plain numeric request may arrive already decoded, as an array
request (`handle_many` only, see ARRAY_REQUESTS below): the runtime parsed the JSON
anyway, so the model process gets float64 values instead of parsing it again.
"""

import base64
import hashlib
import hmac
import json
import os
import struct

import serveml_loader

try:
    import serveml_v2
except ImportError:  # the local runtime's model processes: the runtime translates V2 itself
    serveml_v2 = None

try:
    import orjson

    def _loads(data):
        return orjson.loads(data)

    def _dumps(obj):
        return orjson.dumps(obj)

except ImportError:  # the model's environment decides; plain json works the same

    def _loads(data):
        return json.loads(data)

    def _dumps(obj):
        return json.dumps(obj, separators=(",", ":")).encode()


HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_FILE = "serveml.json"
METHODS = ("predict", "predict_proba", "decision_function")


# Array requests: the local runtime's gateway decodes a plain numeric request (`{"data": [numbers]}`
# or `{"instances": [[numbers], ...]}`, optional "method") and hands the rows over as float64, so
# that this process parses no JSON. Layout (deployments/runtime/protocol.py writes it): ARRAY_MAGIC,
# flags (ARRAY_SINGLE: it was {"data": row}), a zero byte, the method's length, rows, columns; the
# method padded with NUL bytes to a multiple of 8; rows x columns little-endian float64 values.
# model_server.py tells the runtime that this handler takes them when ARRAY_REQUESTS is 1; a
# handler without it (an older build context) gets JSON only. Lambda never sees them.
ARRAY_REQUESTS = 1
ARRAY_MAGIC = b"\x00SVA"  # a NUL byte first: no JSON body starts with it
ARRAY_HEADER = struct.Struct("<4sBxHII")
ARRAY_SINGLE = 1


class BadRequest(ValueError):
    pass


class Model:
    def __init__(self, estimator):
        self.estimator = estimator
        self.model_type = type(estimator).__name__
        self.methods = tuple(m for m in METHODS if hasattr(estimator, m))
        names = getattr(estimator, "feature_names_in_", None)
        self.feature_names = [str(n) for n in names] if names is not None else None
        n_features = getattr(estimator, "n_features_in_", None)
        self.n_features = int(n_features) if n_features is not None else None
        try:
            import pandas

            self.pandas = pandas
        except ImportError:
            self.pandas = None


def config(directory=HERE):
    """What ServeML generated for this deployment (see deployments/pipeline/stages.py, package)."""
    with open(os.path.join(directory, CONFIG_FILE), "rb") as handle:
        return json.load(handle)


def load_estimator(directory=HERE):
    settings = config(directory)
    path = os.path.join(directory, os.path.basename(settings["model_file"]))
    return serveml_loader.load(path, settings["format"], settings["allowed_globals"])


_model = None


def model():
    global _model
    if _model is None:
        _model = Model(load_estimator())
    return _model


def _matrix(m, rows):
    """Turn rows of the request into what the estimator's methods take."""
    first = rows[0]
    if isinstance(first, dict):
        if not all(isinstance(row, dict) for row in rows):
            raise BadRequest("mix of records and lists: send every row in the same shape")
        if m.feature_names is None:
            raise BadRequest(
                "this model was not fitted with feature names: send each row as a list of "
                f"{m.n_features} values instead of a record"
            )
        for number, row in enumerate(rows):
            missing = [name for name in m.feature_names if name not in row]
            if missing:
                raise BadRequest(f"row {number} is missing features: {', '.join(missing)}")
            unknown = [key for key in row if key not in m.feature_names]
            if unknown:
                raise BadRequest(
                    f"row {number} has unknown features: {', '.join(map(str, unknown))} "
                    f"(expected {', '.join(m.feature_names)})"
                )
        ordered = [[row[name] for name in m.feature_names] for row in rows]
        return _frame(m, ordered)
    if isinstance(first, (list, tuple)):
        if m.feature_names is None:
            fast = _numeric(m, rows)
            if fast is not None:
                return fast
        for number, row in enumerate(rows):
            if not isinstance(row, (list, tuple)):
                raise BadRequest("mix of records and lists: send every row in the same shape")
            if m.n_features is not None and len(row) != m.n_features:
                raise BadRequest(f"expected {m.n_features} features per row, got {len(row)}")
            for value in row:
                if isinstance(value, (list, dict)):
                    raise BadRequest(
                        f"row {number} holds a nested {type(value).__name__}: features must be numbers or strings"
                    )
        if m.feature_names is not None:
            return _frame(m, rows)
        import numpy

        try:
            return numpy.asarray(rows, dtype=float)
        except (TypeError, ValueError):
            return numpy.asarray(rows, dtype=object)
    if isinstance(first, str):
        if not all(isinstance(row, str) for row in rows):
            raise BadRequest("mix of texts and other rows: send every row in the same shape")
        if m.n_features is not None:
            raise BadRequest(f"expected {m.n_features} features per row, got a string")
        return list(rows)
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        raise BadRequest(
            'each row must be a list of feature values: use {"data": [..]} for one row '
            'or {"instances": [[..], [..]]} for several'
        )
    raise BadRequest(f"unsupported row type {type(first).__name__}: send lists, records or strings")


def _numeric(m, rows):
    """Rows of plain numbers as a float matrix, converted by numpy in one go (a Python loop over
    every value costs a 100-row request as much as the prediction); None for anything else, which
    the checks in _matrix then explain."""
    import numpy

    try:
        X = numpy.asarray(rows, dtype=float)
    except (TypeError, ValueError):
        return None
    if X.ndim != 2 or (m.n_features is not None and X.shape[1] != m.n_features):
        return None
    return X


def _frame(m, rows):
    if m.pandas is not None:
        return m.pandas.DataFrame(rows, columns=m.feature_names)
    import numpy

    return numpy.asarray(rows, dtype=object)


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


def _request(m, payload):
    """The method, rows and shape (one row or several) a decoded request asks for."""
    if isinstance(payload, list):
        payload = {"instances": payload}
    if not isinstance(payload, dict):
        raise BadRequest('request body must be a JSON object such as {"data": [5.1, 3.5, 1.4, 0.2]}')
    method = _method(m, payload.get("method", "predict"))
    if "data" in payload:
        return method, [payload["data"]], True
    if "instances" in payload:
        rows = payload["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest('"instances" must be a non-empty list of rows')
        return method, rows, False
    raise BadRequest('request must have "data" (one row) or "instances" (a list of rows)')


def _method(m, method):
    if method not in m.methods:
        raise BadRequest(f"method {method!r} is not available for {m.model_type}; use one of: {', '.join(m.methods)}")
    return method


def _array_request(m, body):
    """The method, rows and shape of an array request, as _request and _matrix read the JSON it came
    from (the same checks in the same order, so the same errors). Nothing in its header is trusted:
    a frame whose values do not fill its shape exactly is refused before anything is read."""
    size = len(body)
    if size < ARRAY_HEADER.size:
        raise BadRequest(f"malformed array request: {size} bytes, shorter than its header")
    magic, flags, method_size, rows, columns = ARRAY_HEADER.unpack_from(body)
    start = ARRAY_HEADER.size + method_size + (-method_size % 8)
    if magic != ARRAY_MAGIC or flags & ~ARRAY_SINGLE:
        raise BadRequest("malformed array request: unknown magic or flags")
    if not rows or not columns or (flags and rows != 1):
        raise BadRequest(f"malformed array request: a shape of {rows} x {columns}")
    if size - start != rows * columns * 8:  # Python integers: no product overflows
        raise BadRequest(
            f"malformed array request: {rows} x {columns} float64 values are {rows * columns * 8} bytes, "
            f"it holds {max(size - start, 0)}"
        )
    try:
        method = body[ARRAY_HEADER.size : ARRAY_HEADER.size + method_size].decode() if method_size else "predict"
    except UnicodeDecodeError:
        raise BadRequest("malformed array request: its method is not UTF-8") from None
    _method(m, method)
    if m.n_features is not None and columns != m.n_features:
        raise BadRequest(f"expected {m.n_features} features per row, got {columns}")
    import numpy

    # A copy: writable and aligned, the very array the JSON path builds (a model may write to its input).
    X = numpy.frombuffer(body, dtype="<f8", count=rows * columns, offset=start).reshape(rows, columns).copy()
    return method, X, bool(flags)


def _predict_array(m, body):
    method, X, single = _array_request(m, body)
    if m.feature_names is not None:  # the runtime sends these models JSON; as their float rows would be
        X = _frame(m, X.tolist())
    return _predicted(m, method, X, single)


def handle_array(body):
    """An array request in, (HTTP status, JSON bytes) out: what handle() answers for the JSON it came from."""
    try:
        return 200, _dumps(_predict_array(model(), body))
    except BadRequest as exc:
        return 400, _dumps({"error": str(exc)})


def _handle_one(body):
    return handle_array(body) if body[:4] == ARRAY_MAGIC else handle(body)


def _answer(m, result, single):
    if single:
        return {"prediction": result[0], "model_type": m.model_type}
    return {"predictions": result, "model_type": m.model_type}


def predict(payload):
    """Apply the prediction contract to a decoded request; returns the response object."""
    m = model()
    method, rows, single = _request(m, payload)
    return _predicted(m, method, _matrix(m, rows), single)


def _predicted(m, method, X, single):
    """The answer to one request: `method` applied to its rows `X`."""
    try:
        result = _plain(getattr(m.estimator, method)(X))
    except Exception as exc:  # the estimator rejects the input: say why, never 500
        raise BadRequest(f"the model could not {method} this input: {exc}") from None
    return _answer(m, result, single)


def handle_many(bodies):
    """Several requests at once, JSON or array requests. Plain numeric rows asking for the same
    method share one vectorised call of the estimator; everything else, and any group whose call
    fails, is answered request by request, so each error belongs to its own request."""
    if len(bodies) == 1:
        return [_handle_one(bodies[0])]
    import numpy

    m = model()
    answers = [None] * len(bodies)
    groups = {}
    for index, body in enumerate(bodies):
        try:
            if m.feature_names is not None:
                X = None  # rows become a DataFrame, request by request
            elif body[:4] == ARRAY_MAGIC:
                method, X, single = _array_request(m, body)
            else:
                method, rows, single = _request(m, _loads(body))
                X = _numeric(m, rows)
        except (ValueError, RecursionError):  # not JSON, or a BadRequest: answered alone, which says which
            X = None
        if X is None:
            answers[index] = _handle_one(body)
        else:
            groups.setdefault(method, []).append((index, single, X))
    for method, members in groups.items():
        try:
            result = _plain(getattr(m.estimator, method)(numpy.concatenate([X for _, _, X in members])))
        except Exception:
            for index, _, _ in members:
                answers[index] = _handle_one(bodies[index])
            continue
        start = 0
        for index, single, X in members:
            answers[index] = (200, _dumps(_answer(m, result[start : start + len(X)], single)))
            start += len(X)
    return answers


def handle(body):
    """bytes in, (HTTP status, JSON bytes) out: the whole contract, used by both targets."""
    try:
        payload = _loads(body)
    except ValueError as exc:
        return 400, _dumps({"error": f"request body is not valid JSON: {exc}"})
    except RecursionError:  # the runtime refuses such bodies first; Lambda has only this
        return 400, _dumps({"error": "request body is nested too deeply: send rows of feature values"})
    try:
        return 200, _dumps(predict(payload))
    except BadRequest as exc:
        return 400, _dumps({"error": str(exc)})


def authorised(headers, environ=os.environ):
    """Private Lambda deployments: the function's environment holds whether it is private and
    the SHA-256 of each active key (ServeML updates both when keys change), never a key."""
    if environ.get("SERVEML_PRIVATE") != "1":
        return True
    known = [digest for digest in environ.get("SERVEML_KEY_SHA256", "").split(",") if digest]
    headers = {str(name).lower(): str(value) for name, value in (headers or {}).items()}
    presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    if not presented:
        return False
    digest = hashlib.sha256(presented.encode()).hexdigest()
    # Compare against every key, without stopping early, in constant time each.
    return any([hmac.compare_digest(digest, candidate) for candidate in known])


def signature(m):
    """What the probe records about a model (see probe.py), read off the loaded one."""
    classes = getattr(m.estimator, "classes_", None)
    return {
        "model_type": m.model_type,
        "n_features_in": m.n_features,
        "feature_names_in": m.feature_names,
        "classes": _plain(classes) if classes is not None else None,
        "methods": list(m.methods),
    }


_config = None


def handle_v2(method, path, headers, body):
    """An Open Inference Protocol (V2) request, translated by serveml_v2.py onto `predict`:
    (HTTP status, response headers, body bytes). `headers` have lower-case names."""
    global _config
    v2 = serveml_v2
    as_json = {"Content-Type": "application/json"}
    try:
        action, deployment_id = v2.route(method, path)
        if deployment_id is None:  # the server's own: metadata, live, ready
            return 200, as_json, _dumps(v2.server_metadata()) if action == "server" else b""
        if _config is None:
            _config = config()
        served = str(_config.get("deployment_id", ""))
        if not authorised(headers):
            return 401, as_json, _dumps({"error": PRIVATE})
        if deployment_id != served:
            raise v2.V2Error(f"no deployment answers at this URL: this endpoint serves {served}", 404)
        m = model()
        # The validated example row (serveml.json) tells which DataFrame columns hold text.
        described = v2.describe(signature(m), _config.get("example"))
        if action == "ready":
            return 200, as_json, b""
        if action == "metadata":
            return 200, as_json, _dumps(v2.model_metadata(deployment_id, described))
        if len(body) > v2.MAX_BODY:
            raise v2.V2Error(f"request body is larger than {v2.MAX_BODY // 1024**2} MB", 413)
        body = v2.decompress(body, headers.get("content-encoding"))
        request = v2.parse(body, headers.get("inference-header-content-length"), _loads)
        rows, outputs = v2.plan(request, described)
        try:
            answers = [predict(v2.serveml_request(rows, name)) for name, _ in outputs]
        except BadRequest as exc:
            return 400, as_json, _dumps({"error": str(exc)})
        return (200, *v2.encode(*v2.response(deployment_id, request, outputs, answers), _dumps))
    except v2.V2Error as exc:
        return exc.status, as_json, _dumps({"error": exc.message})


PRIVATE = (
    "this endpoint is private: send one of its API keys as `Authorization: Bearer <key>` "
    "or `X-API-Key: <key>` (the deployment's owner creates keys on its page)"
)


def _lambda_answer(status, out, headers=None):
    headers = headers or {"Content-Type": "application/json"}
    if headers.get("Content-Type") == "application/json":
        return {"statusCode": status, "headers": headers, "body": out.decode()}
    return {"statusCode": status, "headers": headers, "body": base64.b64encode(out).decode(), "isBase64Encoded": True}


def lambda_handler(event, context):
    # HTTP API (payload 2.0) events carry rawPath and requestContext.http; REST API ones path and httpMethod.
    path = event.get("rawPath") or event.get("path") or "/"
    method = ((event.get("requestContext") or {}).get("http") or {}).get("method") or event.get("httpMethod")
    headers = {str(name).lower(): str(value) for name, value in (event.get("headers") or {}).items()}
    v2 = path == "/v2" or path.startswith("/v2/")
    if not v2 and not authorised(headers):
        return _lambda_answer(401, _dumps({"error": PRIVATE}))
    body = event.get("body") or b""
    if event.get("isBase64Encoded") and body:
        try:
            body = base64.b64decode(body)
        except ValueError:
            return _lambda_answer(400, _dumps({"error": "request body is not valid base64"}))
    elif isinstance(body, str):
        body = body.encode()
    if v2:
        status, answer_headers, out = handle_v2(method or "GET", path, headers, body)
        return _lambda_answer(status, out, answer_headers)
    return _lambda_answer(*handle(body))
