"""The local runtime's model process: serves one deployment's handler over a pipe.

Run by the deployment's environment interpreter inside the sandbox as
`python -I model_server.py BUILD_DIR [LABEL]`. It imports the very handler.py that
the Lambda image runs, loads the model once, then answers requests for as
long as the runtime keeps it: no process is started per request.

On stdin, batches: a 4-byte big-endian count, then that many requests, each a
4-byte length and the body. On stdout, for each request in order: a 4-byte
length, a 2-byte HTTP status, the body. The first frame out is the load
result (200 when the model is loaded). Requests that arrive together are
answered together (handler.handle_many vectorises compatible ones).
Only stdlib here: the environment holds nothing but the model's requirements.
"""

import os
import struct
import sys
import traceback


def main(build_dir: str) -> None:
    # The protocol owns the real stdout; anything the model prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer

    def send(status: int, body: bytes) -> None:
        channel.write(struct.pack(">IH", len(body), status) + body)

    sys.path.insert(0, build_dir)
    try:
        import handler

        handler.model()
    except BaseException as exc:  # report why, then exit: the runtime shows it to the caller
        traceback.print_exc()
        send(503, f"the model failed to load: {type(exc).__name__}: {exc}".encode())
        return
    send(200, b"ready")
    handle_many = handler.handle_many
    read = requests.read
    unpack, pack = struct.unpack, struct.pack
    while True:
        header = read(4)
        if len(header) < 4:
            return
        (count,) = unpack(">I", header)
        bodies = []
        for _ in range(count):
            (size,) = unpack(">I", read(4))
            bodies.append(read(size))
        out = [pack(">IH", len(body), status) + body for status, body in handle_many(bodies)]
        channel.write(b"".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
