"""The Open Inference Protocol (V2 REST, as KServe, MLServer and Triton speak it), translated
to and from ServeML's own prediction contract.

Shared by the local runtime (deployments/runtime/v2.py, in ServeML's process) and the
Lambda handler (serveml_handler.py, in the model's environment): stdlib only, and nothing
here imports from ServeML. A V2 request becomes `{"instances": rows, "method": m}` for
the one prediction path both targets already have; its answer becomes V2 output tensors.

- Row-shaped: one input of shape [N, F] (text models: [N] BYTES).
- Column-shaped, for models fitted on a DataFrame: one input per feature name, each [N] or
  [N, 1] (what MLServer's pandas codec sends).
- The method: MLServer's convention, an output named after it (`predict`, `predict_proba`,
  `decision_function`), or the request parameter `method`; `predict` by default.
- JSON tensors (flat or nested row-major data) and Triton's binary tensor extension
  (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`/`binary_data_output`).

Everything a client sends is hostile: sizes, shapes and types are checked, and a shape is
refused before anything of its size is allocated. Each refusal is a V2Error with the HTTP
status and a message for people.
"""

import math
import struct
import uuid
import zlib

MAX_ELEMENTS = 1_000_000  # values in one request, all inputs together
MAX_INPUTS = 4096  # a DataFrame with more columns than this is not served through V2
MAX_BODY = 10 * 1024 * 1024
VERSION = "1"  # deployments have one version for now; V2 clients may name it
PLATFORM = "sklearn"
EXTENSIONS = ["binary_tensor_data"]
METHODS = ("predict", "predict_proba", "decision_function")

# datatype -> struct format (little-endian, as Triton's binary extension sends it)
FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
INT_RANGES = {}
for _name, _code in FORMATS.items():
    if "INT" in _name:
        _bits = 8 * struct.calcsize(_code)
        INT_RANGES[_name] = (0, 2**_bits - 1) if _name.startswith("U") else (-(2 ** (_bits - 1)), 2 ** (_bits - 1) - 1)
DATATYPES = (*FORMATS, "BYTES")
REQUEST_PARAMETERS = {"method", "binary_data_output", "content_type"}
INPUT_PARAMETERS = {"binary_data_size", "content_type"}
OUTPUT_PARAMETERS = {"binary_data"}


class V2Error(ValueError):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ routes


def route(method, path, versions=False):
    """What a V2 URL asks for: (action, deployment id or None). Raises V2Error 404/405.

    With `versions` (the local runtime, where a deployment has versions), (action, deployment
    id, the version number the URL names or None); otherwise only version 1 exists."""
    parts = [part for part in path.split("/") if part]
    if parts[:1] != ["v2"]:
        raise V2Error("no deployment answers at this URL", 404)
    rest = parts[1:]
    if rest in ([], ["health", "live"], ["health", "ready"]):
        _allow(method, "GET")
        action = "server" if not rest else rest[1]
        return (action, None, None) if versions else (action, None)
    if len(rest) < 2 or rest[0] != "models":
        raise V2Error("no V2 endpoint answers at this URL: see /v2/models/<deployment id>", 404)
    deployment_id = canonical_id(rest[1])
    tail = rest[2:]
    number = None
    if versions and tail[:1] == ["versions"] and len(tail) > 1 and tail[1].isdigit() and tail[1].isascii():
        number, tail = int(tail[1]), tail[2:]
        if not 0 < number < 2**31:
            raise V2Error(f"deployment {rest[1]} has no version {number}", 404)
    elif tail[:1] == ["versions"]:
        if len(tail) < 2 or tail[1] != VERSION:
            raise V2Error(
                f"deployment {rest[1]} has no version {tail[1] if len(tail) > 1 else ''!s}: deployments have "
                f"one version for now; use version {VERSION} or leave the version out of the URL",
                404,
            )
        tail = tail[2:]
    if not tail:
        action = "metadata"
        _allow(method, "GET")
    elif tail == ["ready"]:
        action = "ready"
        _allow(method, "GET")
    elif tail == ["infer"]:
        action = "infer"
        _allow(method, "POST")
    else:
        action = None
    if action:
        return (action, deployment_id, number) if versions else (action, deployment_id)
    raise V2Error("no V2 endpoint answers at this URL: a model has /ready, /infer and its metadata", 404)


def _allow(method, expected):
    if method != expected:
        raise V2Error(f"use {expected} for this V2 endpoint", 405)


def canonical_id(text):
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise V2Error("no deployment answers at this URL", 404) from None


def server_metadata():
    return {"name": "serveml", "version": VERSION, "extensions": EXTENSIONS}


# ------------------------------------------------------------------ model metadata


def describe(signature, example=None):
    """What a model takes and gives, from its signature as the probe records it
    (model_type, n_features_in, feature_names_in, classes, methods) and, for DataFrame
    models, an example row telling which columns hold text."""
    names = signature.get("feature_names_in") or None
    n_features = signature.get("n_features_in")
    kind = "records" if names else "numbers" if n_features is not None else "text"
    text_columns = set()
    if names and isinstance(example, dict):
        text_columns = {name for name in names if isinstance(example.get(name), str)}
    return {
        "model_type": signature.get("model_type", ""),
        "feature_names": [str(name) for name in names] if names else None,
        "n_features": int(n_features) if n_features is not None else None,
        "classes": signature.get("classes"),
        "methods": [m for m in signature.get("methods", ["predict"]) if m in METHODS],
        "input": kind,
        "text_columns": text_columns,
    }


def model_metadata(name, model):
    if model["input"] == "records":
        inputs = [
            {"name": column, "datatype": "BYTES" if column in model["text_columns"] else "FP64", "shape": [-1]}
            for column in model["feature_names"]
        ]
    elif model["input"] == "numbers":
        inputs = [{"name": "input-0", "datatype": "FP64", "shape": [-1, model["n_features"]]}]
    else:
        inputs = [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    classes = model["classes"]
    outputs = []
    for method in model["methods"]:
        if method == "predict" and classes and isinstance(classes[0], list):  # one label per output
            labels = [label for labels in classes for label in labels]
            outputs.append({"name": method, "datatype": _datatype_of(labels), "shape": [-1, len(classes)]})
            classes = None  # predict_proba is then a list of tensors: not described
        elif method == "predict":
            outputs.append({"name": method, "datatype": _datatype_of(classes) if classes else "FP64", "shape": [-1]})
        elif classes and (method == "predict_proba" or len(classes) > 2):
            outputs.append({"name": method, "datatype": "FP64", "shape": [-1, len(classes)]})
        else:
            outputs.append({"name": method, "datatype": "FP64", "shape": [-1]})
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {"model_type": model["model_type"]},
    }


# ------------------------------------------------------------------ requests


def decompress(body, encoding):
    """A gzip or deflate body, inflated to at most MAX_BODY bytes (413 beyond)."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none", 400)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, MAX_BODY + 1)
    except zlib.error as exc:
        raise V2Error(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > MAX_BODY:
        raise V2Error(f"request body is larger than {MAX_BODY // 1024**2} MB once inflated", 413)
    return out


def parse(body, header_length, loads):
    """The request: its JSON header decoded with `loads`, each input's values decoded into a
    flat list (binary ones too) and checked against its shape and datatype."""
    binary = b""
    if header_length not in (None, ""):
        try:
            size = int(header_length)
        except (TypeError, ValueError):
            raise V2Error("Inference-Header-Content-Length must be a whole number of bytes") from None
        if not 0 <= size <= len(body):
            raise V2Error(f"Inference-Header-Content-Length is {size} but the body holds {len(body)} bytes")
        body, binary = body[:size], body[size:]
    try:
        request = loads(body)
    except RecursionError:
        raise V2Error("request body is nested too deeply") from None
    except ValueError as exc:
        hint = (
            " (a binary tensor body needs the Inference-Header-Content-Length header)"
            if header_length in (None, "")
            else ""
        )
        raise V2Error(f"request body is not valid JSON{hint}: {exc}") from None
    if not isinstance(request, dict):
        raise V2Error('a V2 inference request is a JSON object with "inputs"')
    unknown = set(request) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise V2Error(f"unknown fields in the request: {', '.join(sorted(map(str, unknown)))}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error('"id" must be a string')
    parameters = _parameters(request.get("parameters"), REQUEST_PARAMETERS, "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise V2Error('"inputs" must be a non-empty list of tensors')
    if len(inputs) > MAX_INPUTS:
        raise V2Error(f"a request may have at most {MAX_INPUTS} inputs")
    budget = [MAX_ELEMENTS]
    offset = 0
    tensors = []
    for number, spec in enumerate(inputs):
        tensor, used = _input(spec, number, binary, offset, budget)
        offset += used
        tensors.append(tensor)
    if offset != len(binary):
        raise V2Error(
            f"the body holds {len(binary)} bytes of binary tensor data "
            f"but the inputs' binary_data_size add up to {offset}"
        )
    names = [tensor["name"] for tensor in tensors]
    if len(set(names)) != len(names):
        raise V2Error("two inputs have the same name: name each input once")
    outputs = request.get("outputs")
    if outputs is None:
        outputs = []
    if not isinstance(outputs, list):
        raise V2Error('"outputs" must be a list of {"name": ...} objects')
    requested = []
    for spec in outputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise V2Error('each requested output must be an object with a "name"')
        if set(spec) - {"name", "parameters"}:
            raise V2Error(
                f"unknown fields in output {spec['name']!r}: {', '.join(sorted(set(spec) - {'name', 'parameters'}))}"
            )
        output_parameters = _parameters(spec.get("parameters"), OUTPUT_PARAMETERS, f"output {spec['name']!r}")
        binary_out = output_parameters.get("binary_data", parameters.get("binary_data_output", False))
        if not isinstance(binary_out, bool):
            raise V2Error(f"output {spec['name']!r}: binary_data must be true or false")
        requested.append((spec["name"], binary_out))
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise V2Error("binary_data_output must be true or false")
    return {
        "id": request_id,
        "parameters": parameters,
        "inputs": tensors,
        "outputs": requested,
        "binary": binary_default,
    }


def _parameters(value, known, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise V2Error(f"parameters of {where} must be an object")
    unknown = set(value) - known
    if unknown:
        raise V2Error(
            f"unknown parameters in {where}: {', '.join(sorted(map(str, unknown)))} "
            f"(ServeML knows: {', '.join(sorted(known))})"
        )
    return value


def _input(spec, number, binary, offset, budget):
    """One input tensor: (its name, shape, datatype and flat values; binary bytes it used)."""
    if not isinstance(spec, dict):
        raise V2Error(f"input {number} must be an object with name, shape, datatype and data")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise V2Error(f"input {number} needs a name")
    label = f"input {name!r}"
    unknown = set(spec) - {"name", "shape", "datatype", "parameters", "data"}
    if unknown:
        raise V2Error(f"{label} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise V2Error(f"{label} has datatype {datatype!r}: use one of {', '.join(DATATYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise V2Error(f"{label} needs a shape: a list of sizes such as [2, 4] (2 rows of 4 features)")
    if len(shape) > 2:
        raise V2Error(f"{label} has shape {shape}: send [N, F] rows of features, or [N] per column")
    count = 1
    for size in shape:
        count *= size
        if count > budget[0]:  # refused before anything of that size exists
            raise V2Error(f"the inputs hold more than {MAX_ELEMENTS} values: split the request")
    budget[0] -= count
    parameters = _parameters(spec.get("parameters"), INPUT_PARAMETERS, label)
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if type(size) is not int or size < 0:
            raise V2Error(f"{label}: binary_data_size must be a whole number of bytes")
        if "data" in spec:
            raise V2Error(f"{label} has both data and binary_data_size: send one")
        chunk = binary[offset : offset + size]
        if len(chunk) != size:
            raise V2Error(f"{label} announces {size} bytes of binary data but the body holds only {len(chunk)} more")
        values = _from_binary(chunk, datatype, count, label)
        used = size
    else:
        if "data" not in spec:
            raise V2Error(f"{label} has no data")
        values = _flatten(spec["data"], len(shape), label)
        if len(values) != count:
            raise V2Error(f"{label} has shape {shape}, which holds {count} values, but its data has {len(values)}")
        _check(values, datatype, label)
        used = 0
    return {"name": name, "shape": shape, "datatype": datatype, "values": values}, used


def _flatten(data, rank, label):
    """Row-major data, flat or nested up to `rank` levels, as one flat list."""
    if not isinstance(data, list):
        data = [data]
    for _ in range(rank - 1):  # the outer list is the first dimension
        if not any(type(item) is list for item in data):
            break
        if not all(type(item) is list for item in data):
            raise V2Error(f"{label}: data mixes lists and values: nest every row the same way, or send it flat")
        data = [value for item in data for value in item]
    if any(type(item) in (list, dict) for item in data):
        raise V2Error(f"{label}: data is nested deeper than its shape")
    return data


def _check(values, datatype, label):
    kinds = set(map(type, values))
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise V2Error(f"{label} is BYTES: its data must be strings")
    elif datatype == "BOOL":
        if not kinds <= {bool}:
            raise V2Error(f"{label} is BOOL: its data must be true or false")
    elif datatype.startswith(("FP",)):
        if not kinds <= {int, float}:
            raise V2Error(f"{label} is {datatype}: its data must be numbers")
    else:
        if not kinds <= {int}:
            raise V2Error(f"{label} is {datatype}: its data must be whole numbers")
        low, high = INT_RANGES[datatype]
        if values and (min(values) < low or max(values) > high):
            raise V2Error(f"{label} is {datatype}: its data must lie between {low} and {high}")


def _from_binary(chunk, datatype, count, label):
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(chunk):
            if offset + 4 > len(chunk):
                raise V2Error(f"{label}: binary BYTES data ends inside an element's length")
            (size,) = struct.unpack_from("<I", chunk, offset)
            offset += 4
            if offset + size > len(chunk):
                raise V2Error(f"{label}: a binary BYTES element runs past the end of its data")
            try:
                values.append(bytes(chunk[offset : offset + size]).decode())
            except UnicodeDecodeError:
                raise V2Error(f"{label}: BYTES elements must be UTF-8 text") from None
            offset += size
            if len(values) > count:
                break
        if len(values) != count:
            raise V2Error(f"{label} has shape holding {count} values, but its binary data has {len(values)}")
        return values
    code = FORMATS[datatype]
    itemsize = struct.calcsize(code)
    if len(chunk) != count * itemsize:
        raise V2Error(
            f"{label} has {count} values of {datatype} ({count * itemsize} bytes) but {len(chunk)} bytes of binary data"
        )
    return list(struct.unpack(f"<{count}{code}", chunk))


# ------------------------------------------------------------------ to ServeML and back


def plan(request, model):
    """The rows and the methods (one per requested output) a parsed request asks for."""
    methods = model["methods"]
    chosen = request["parameters"].get("method")
    if chosen is not None and chosen not in methods:
        raise V2Error(f"method {chosen!r} is not available for {model['model_type']}; use one of: {', '.join(methods)}")
    outputs = request["outputs"]
    if outputs:
        for name, _ in outputs:
            if name not in methods:
                raise V2Error(
                    f"{model['model_type']} has no output {name!r}: its outputs are {', '.join(methods)} "
                    "(an output is named after the method that computes it)"
                )
        if chosen is not None and any(name != chosen for name, _ in outputs):
            raise V2Error(f'parameters ask for method {chosen!r} but "outputs" ask for others: send one of the two')
    else:
        outputs = [(chosen or "predict", request["binary"])]
    return _rows(request["inputs"], model), outputs


def _rows(tensors, model):
    names = model["feature_names"]
    if names and (len(tensors) > 1 or tensors[0]["name"] in names):
        return _columns(tensors, model)
    if len(tensors) > 1:
        if names is None:
            raise V2Error(
                f"{model['model_type']} was not fitted with feature names: send one input of shape "
                f"[N, {model['n_features']}] instead of one input per column"
                if model["n_features"] is not None
                else f"{model['model_type']} takes one BYTES input of shape [N] (one text per row)"
            )
    [tensor] = tensors
    shape, values, label = tensor["shape"], tensor["values"], f"input {tensor['name']!r}"
    if model["input"] == "text":
        if tensor["datatype"] != "BYTES":
            raise V2Error(f"{label} is {tensor['datatype']}, but {model['model_type']} takes texts: send BYTES")
        if len(shape) == 2 and shape[1] != 1:
            raise V2Error(f"{label} has shape {shape}: send [N] or [N, 1], one text per row")
        if not values:
            raise V2Error(f"{label} holds no rows")
        return values
    width = model["n_features"] if model["n_features"] is not None else len(names)
    if tensor["datatype"] == "BYTES" and model["input"] == "numbers":
        raise V2Error(
            f"{label} is BYTES, but {model['model_type']} takes numbers: send FP64, FP32, INT64 or another number type"
        )
    if len(shape) != 2:
        raise V2Error(f"{label} has shape {shape}: send [N, {width}], one row of {width} features per prediction")
    if shape[1] != width:
        raise V2Error(f"{label} has shape {shape}: expected {width} features per row, got {shape[1]}")
    if shape[0] == 0:
        raise V2Error(f"{label} holds no rows")
    return [values[start : start + width] for start in range(0, len(values), width)]


def _columns(tensors, model):
    names = model["feature_names"]
    by_name = {tensor["name"]: tensor for tensor in tensors}
    unknown = [name for name in by_name if name not in names]
    if unknown:
        raise V2Error(
            f"unknown inputs: {', '.join(unknown)}; {model['model_type']} takes one input per feature "
            f"({', '.join(names)}) or one input of shape [N, {len(names)}]"
        )
    missing = [name for name in names if name not in by_name]
    if missing:
        raise V2Error(f"missing inputs for features: {', '.join(missing)}")
    columns, rows = [], None
    for name in names:
        tensor = by_name[name]
        shape = tensor["shape"]
        if len(shape) == 2 and shape[1] != 1:
            raise V2Error(f"input {name!r} has shape {shape}: a column is [N] or [N, 1]")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise V2Error(
                f"input {name!r} has {shape[0]} rows but input {names[0]!r} has {rows}: send every column whole"
            )
        columns.append(tensor["values"])
    if not rows:
        raise V2Error("the inputs hold no rows")
    return [list(row) for row in zip(*columns, strict=True)]


def serveml_request(rows, method):
    """The request the prediction handler takes (serveml_handler.predict)."""
    return {"instances": rows, "method": method}


def response(name, request, outputs, answers):
    """The V2 response for the handler's answers (one per output, in order): (headers, body
    bytes). `answers` are decoded ServeML answers ({"predictions": [...]})."""
    tensors, chunks = [], []
    for (output, binary), answer in zip(outputs, answers, strict=True):
        tensor = _tensor(output, answer["predictions"])
        if binary:
            chunk = _to_binary(tensor)
            chunks.append(chunk)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            del tensor["data"]
        tensors.append(tensor)
    body = {"model_name": name, "model_version": VERSION, "outputs": tensors}
    if request["id"] is not None:
        body["id"] = request["id"]
    return body, chunks


def encode(body, chunks, dumps):
    """Headers and bytes of a response: JSON alone, or JSON then binary tensors."""
    header = dumps(body)
    if not chunks:
        return {"Content-Type": "application/json"}, header
    return (
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        header + b"".join(chunks),
    )


def _tensor(name, predictions):
    if predictions and isinstance(predictions[0], list):
        width = len(predictions[0])
        if not all(isinstance(row, list) and len(row) == width for row in predictions):
            raise V2Error(f"the model's {name} rows have different lengths: not a tensor", 502)
        shape = [len(predictions), width]
        flat = [value for row in predictions for value in row]
    else:
        shape = [len(predictions)]
        flat = list(predictions)
    return {"name": name, "datatype": _datatype_of(flat), "shape": shape, "data": flat}


def _datatype_of(values):
    kinds = set(map(type, values))
    if kinds and kinds <= {bool}:
        return "BOOL"
    if kinds and kinds <= {int}:
        return "INT64"
    if kinds <= {int, float, type(None)}:  # a NaN became null on its way through JSON
        return "FP64"
    return "BYTES"


def _to_binary(tensor):
    values, datatype = tensor["data"], tensor["datatype"]
    if datatype == "BYTES":
        parts = []
        for value in values:
            raw = (value if isinstance(value, str) else str(value)).encode()
            parts += (struct.pack("<I", len(raw)), raw)
        return b"".join(parts)
    if datatype == "FP64":
        values = [math.nan if value is None else value for value in values]
    return struct.pack(f"<{len(values)}{FORMATS[datatype]}", *values)


def error(message):
    return {"error": message}
