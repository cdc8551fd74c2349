"""What the runtime's ASGI endpoints share (app.py's ServeML JSON and v2.py's Open Inference
Protocol): reading a bounded body, checking JSON before it reaches a model, answering."""

import uuid
from itertools import chain

import numpy
import orjson

from deployments.runtime import protocol

MAX_BODY = 10 * 1024 * 1024
MAX_DEPTH = 32  # no prediction input nests this deep; a hostile one nests far deeper
CONTAINERS = frozenset({list, dict})
JSON = [(b"content-type", b"application/json")]


def check_body(body: bytes) -> tuple[str | None, int]:
    """Why a prediction body must not reach the model (or None), and the rows it carries
    (row_count) when it may. Parsed here once, so a body no handler could take costs the model
    process nothing (it still gets the raw bytes), and the same parse counts the rows."""
    problem, rows, _ = check_prediction(body, arrays=False)
    return problem, rows


def check_prediction(body: bytes, arrays: bool) -> tuple[str | None, int, bytes | None]:
    """check_body, and, with `arrays`, the request as an array request (protocol.py) when it is
    plain numeric rows (numeric_rows): the model process then parses no JSON. None otherwise."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"request body is not valid JSON: {exc}", 0, None
    if arrays and (frame := numeric_rows(value, body)) is not None:
        return None, frame[1], frame[0]  # dict, list, list, numbers: no deeper
    if nested_deeper_than(value, MAX_DEPTH):
        return f"request body is nested deeper than {MAX_DEPTH} levels", 0, None
    return None, row_count(value), None


def numeric_rows(value, body: bytes) -> tuple[bytes, int] | None:
    """`{"data": [numbers]}` or `{"instances": [[numbers], ...]}` with rows of equal length, one
    number at least, and perhaps a "method" string, as an array request and its row count; None
    for anything else (records, texts, nulls, booleans, ragged or empty rows, other keys), which
    goes to the model as JSON. The values are the float64 numbers the handler's numpy.asarray(rows,
    dtype=float) makes of the same rows (serveml_handler._numeric), so the answers are the same."""
    if type(value) is not dict:
        return None
    method = value.get("method")
    if len(value) != (1 if method is None else 2) or (method is not None and type(method) is not str):
        return None  # {"method": null} included: the handler answers that no such method exists
    if "data" in value:
        rows, single = [value["data"]], True
    else:
        rows, single = value.get("instances"), False
    if type(rows) is not list or not rows or type(first := rows[0]) is not list or not first:
        return None
    if b"true" in body or b"false" in body:
        return None  # numpy would take a boolean for 1 or 0; JSON spells them only this way
    try:
        X = numpy.array(rows)  # ints, floats or both: a 2-D int or float array; else anything but
    except (ValueError, TypeError, OverflowError):  # ragged rows, say
        return None
    if X.ndim != 2 or X.dtype.kind not in "fiu":
        return None
    frame = protocol.encode_array(method, single, X.astype("<f8", copy=False))
    return None if frame is None else (frame, len(rows))


def row_count(value) -> int:
    """The rows a ServeML request asks predictions for, read as the handler reads them
    (serveml_handler._request): `{"data": [...]}` one, `{"instances": [...]}` and a list of
    records as many as they hold; 0 for what the handler refuses. No loop over the rows."""
    kind = type(value)
    if kind is list:
        return len(value)
    if kind is dict:
        if "data" in value:
            return 1
        instances = value.get("instances")
        if type(instances) is list:
            return len(instances)
    return 0


def nested_deeper_than(value, limit: int) -> bool:
    """True when lists and objects nest more than `limit` deep. Level by level rather than
    recursively, so no input can exhaust the stack, and in C where it can: rows of numbers
    cost a type() per number and no Python loop over them."""
    level = [value]  # the values inside as many lists and objects as rounds so far
    for _ in range(limit):
        kinds = set(map(type, level))
        if kinds.isdisjoint(CONTAINERS):
            return False
        if not kinds <= CONTAINERS:
            level = [item for item in level if type(item) in CONTAINERS]
        if dict in kinds:
            level = [item.values() if type(item) is dict else item for item in level]
        level = list(chain.from_iterable(level))
    # `limit` levels down, a list or an object still there nests one level deeper.
    return not CONTAINERS.isdisjoint(map(type, level))


def canonical_uuid(parts: list[str]) -> str | None:
    """The one spelling of a deployment id that pools are kept under: upper case, braces or
    `urn:uuid:` must not start a second pool (and model processes) for the same deployment."""
    if len(parts) != 2:
        return None
    try:
        return str(uuid.UUID(parts[1]))
    except ValueError:
        return None


def error(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    start = [(name.lower().encode(), value.encode()) for name, value in headers.items()] if headers else JSON
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": start + [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
