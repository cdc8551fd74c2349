"""The transport floor plus one process hop: http_floor.py's app, except that each request's
body goes over a pipe to a child process, which answers a constant through another pipe.

Run with the same uvicorn as http_floor.py: `uvicorn hop_floor:app`. A server that keeps the
user's model out of its own process (ServeML's model processes) pays at least this for every
request; what it spends beyond this and the model's own `predict` is its own overhead. The
child is a plain interpreter reading and writing length-prefixed frames: no sandbox, no
model, no JSON, so the hop costs what the pipes, the two wake-ups and two Python loops cost.
"""

import asyncio
import os
import struct
import subprocess
import sys

ANSWER = b'{"prediction":0,"model_type":"none"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
LENGTH = struct.Struct(">I")
CHILD = f"""
import os, struct, sys
length, answer = struct.Struct(">I"), {ANSWER!r}
read, write = sys.stdin.buffer.read, os.fdopen(os.dup(1), "wb", buffering=0).write
frame = length.pack(len(answer)) + answer
while len(header := read(4)) == 4:
    read(length.unpack(header)[0])
    write(frame)
"""


class Child(asyncio.Protocol):
    """The child's answers, in order, to the requests waiting for them."""

    def __init__(self):
        self.buffer = bytearray()
        self.waiting = []

    def data_received(self, data):
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < LENGTH.size + size:
                return
            answer = bytes(self.buffer[LENGTH.size : LENGTH.size + size])
            del self.buffer[: LENGTH.size + size]
            self.waiting.pop(0).set_result(answer)


child: Child | None = None
to_child: asyncio.WriteTransport | None = None


async def start() -> None:
    global child, to_child
    loop = asyncio.get_running_loop()
    child_in, parent_out = os.pipe()
    parent_in, child_out = os.pipe()
    subprocess.Popen([sys.executable, "-I", "-c", CHILD], stdin=child_in, stdout=child_out)
    os.close(child_in)
    os.close(child_out)
    child = Child()
    await loop.connect_read_pipe(lambda: child, os.fdopen(parent_in, "rb", buffering=0))
    to_child, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(parent_out, "wb", buffering=0))


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    answer = asyncio.get_running_loop().create_future()
    child.waiting.append(answer)
    to_child.write(LENGTH.pack(len(body)) + body)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": await answer})
