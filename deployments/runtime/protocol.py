"""The frames the runtime and a model process exchange over the process's pipes.

Both sides use this one file: the runtime imports it as part of ServeML, and a
copy sits next to model_server.py in the model process's private folder, where
only the standard library and the model's own requirements exist. So: stdlib
only, and nothing here may import from ServeML.

Runtime → model process (stdin), one batch at a time: a 4-byte big-endian
count, then that many requests, each a 4-byte length and the body.

Model process → runtime (stdout), one answer per request, in order: a 4-byte
length, a 2-byte HTTP status, the body. The first answer is the load result
(200 when the model is loaded): its body is READY, or READY_ARRAYS when the
deployment's handler takes array requests (below).

A request body is the client's JSON as it came, or, for a plain numeric request
sent to a process that announced READY_ARRAYS, an array request: the rows the
runtime already decoded, as float64 (serveml_handler.py reads it; it keeps its
own copy of this layout, since the Lambda image has no protocol.py):

    ARRAY_HEADER (little-endian, 16 bytes): ARRAY_MAGIC (4 bytes: a NUL byte
    first, which no JSON body starts with), flags (1 byte: ARRAY_SINGLE for
    {"data": row}), a zero byte, the method's length in UTF-8 bytes (2 bytes,
    0: none asked, "predict"), rows (4 bytes), columns (4 bytes); the method,
    padded with NUL bytes to a multiple of 8 (so the values are aligned), then
    rows × columns little-endian float64 values, row after row.
"""

import struct

COUNT = struct.Struct(">I")  # how many requests a batch holds
LENGTH = struct.Struct(">I")  # one request body's length
ANSWER_HEADER = struct.Struct(">IH")  # one answer's body length and HTTP status

READY = b"ready"
READY_ARRAYS = b"ready; arrays=1"  # the handler takes array requests (serveml_handler.ARRAY_REQUESTS == 1)
ARRAY_MAGIC = b"\x00SVA"
ARRAY_HEADER = struct.Struct("<4sBxHII")
ARRAY_SINGLE = 1
MAX_METHOD_BYTES = 255  # a longer one is no method any model has: it goes as JSON, to be refused there

# An answer announcing more than this is refused before any of it is buffered: the
# runtime must not hold whatever a broken or hostile model decides to write.
MAX_ANSWER_BYTES = 64 * 1024**2


class AnswerTooLarge(ValueError):
    def __init__(self, size: int):
        super().__init__(f"an answer of {size} bytes is larger than {MAX_ANSWER_BYTES} bytes")
        self.size = size


def encode_requests(bodies: list[bytes]) -> bytes:
    parts = [COUNT.pack(len(bodies))]
    for body in bodies:
        parts += (LENGTH.pack(len(body)), body)
    return b"".join(parts)


def encode_array(method: str | None, single: bool, values) -> bytes | None:
    """An array request for `values` (a C-contiguous 2-D float64 array, or anything with
    .shape and the buffer protocol holding little-endian float64 row after row); None when the
    method cannot be carried (too long, not UTF-8), which leaves the request to go as JSON."""
    name = b""
    if method is not None:
        try:
            name = method.encode()
        except UnicodeEncodeError:
            return None
        if not name or len(name) > MAX_METHOD_BYTES:
            return None
    rows, columns = values.shape
    header = ARRAY_HEADER.pack(ARRAY_MAGIC, ARRAY_SINGLE if single else 0, len(name), rows, columns)
    return b"".join((header, name, bytes(-len(name) % 8), values))


def read_requests(read) -> list[bytes] | None:
    """The next batch from a blocking `read(n)`, or None once the runtime closed the pipe."""
    header = read(COUNT.size)
    if len(header) < COUNT.size:
        return None
    (count,) = COUNT.unpack(header)
    bodies = []
    for _ in range(count):
        (size,) = LENGTH.unpack(read(LENGTH.size))
        bodies.append(read(size))
    return bodies


def encode_answer(status: int, body: bytes) -> bytes:
    return ANSWER_HEADER.pack(len(body), status) + body


def encode_answers(answers) -> bytes:
    """(status, body) pairs as one write, so a batch costs one system call."""
    return b"".join([ANSWER_HEADER.pack(len(body), status) + body for status, body in answers])


def decode_answer(buffer, offset: int = 0) -> tuple[int, bytes, int] | None:
    """The answer starting at `offset` in `buffer`: (status, body, where the next one starts),
    or None while it is incomplete. Raises AnswerTooLarge as soon as the header is in."""
    if len(buffer) - offset < ANSWER_HEADER.size:
        return None
    size, status = ANSWER_HEADER.unpack_from(buffer, offset)
    if size > MAX_ANSWER_BYTES:
        raise AnswerTooLarge(size)
    start = offset + ANSWER_HEADER.size
    end = start + size
    if len(buffer) < end:
        return None
    return status, bytes(buffer[start:end]), end
