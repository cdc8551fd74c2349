"""The local runtime's model process: serves one deployment's handler over a pipe.

Run by the deployment's environment interpreter inside the sandbox as
`python -I model_server.py BUILD_DIR [LABEL]`. It imports the very handler.py that
the Lambda image runs, loads the model once, then answers requests for as
long as the runtime keeps it: no process is started per request.

Frames on stdin: 4-byte big-endian length, then the request body.
Frames on stdout: 4-byte length, 2-byte HTTP status, then the response body.
The first frame out is the load result (200 when the model is loaded).
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
    handle = handler.handle
    read = requests.read
    while True:
        header = read(4)
        if len(header) < 4:
            return
        (size,) = struct.unpack(">I", header)
        status, body = handle(read(size))
        send(status, body)


if __name__ == "__main__":
    main(sys.argv[1])
