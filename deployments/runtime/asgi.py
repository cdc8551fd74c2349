"""What the runtime's ASGI endpoints share (app.py's ServeML JSON and v2.py's Open Inference
Protocol): reading a bounded body, checking JSON before it reaches a model, answering."""

import uuid
from itertools import chain

import orjson

MAX_BODY = 10 * 1024 * 1024
MAX_DEPTH = 32  # no prediction input nests this deep; a hostile one nests far deeper
CONTAINERS = frozenset({list, dict})
JSON = [(b"content-type", b"application/json")]


def check_body(body: bytes) -> tuple[str | None, int]:
    """Why a prediction body must not reach the model (or None), and the rows it carries
    (row_count) when it may. Parsed here once, so a body no handler could take costs the model
    process nothing (it still gets the raw bytes), and the same parse counts the rows."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"request body is not valid JSON: {exc}", 0
    if nested_deeper_than(value, MAX_DEPTH):
        return f"request body is nested deeper than {MAX_DEPTH} levels", 0
    return None, row_count(value)


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
