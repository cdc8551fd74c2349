"""The local runtime's model process: serves one deployment's handler over a pipe.

Run by the deployment's environment interpreter inside the sandbox as
`python -I -B model_server.py BUILD_DIR [LABEL]`, in a folder holding this file,
protocol.py (the frame format, shared with the runtime:
deployments/runtime/protocol.py) and the deployment's build context: the very
serveml_handler.py that the Lambda image runs, its loader, serveml.json and the
model. It loads the model once, then answers requests for as long as the
runtime keeps it: no process is started per request.

Requests that arrive together are answered together (serveml_handler.handle_many
vectorises compatible ones). The "ready" frame says whether the handler takes array
requests (protocol.py): a build context packaged before they existed holds a handler
that does not, and the runtime then sends it JSON only.
Only stdlib here: the environment holds nothing but the model's requirements.
"""

import os
import sys
import traceback


def main(build_dir: str) -> None:
    # The protocol owns the real stdout; anything the model prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer

    # -I leaves the script's own folder off sys.path; protocol.py and the handler live there.
    sys.path.insert(0, build_dir)
    import protocol

    try:
        import serveml_handler as handler

        handler.model()
    except BaseException as exc:  # report why, then exit: the runtime shows it to the caller
        traceback.print_exc()
        channel.write(protocol.encode_answer(503, f"the model failed to load: {type(exc).__name__}: {exc}".encode()))
        return
    arrays = getattr(handler, "ARRAY_REQUESTS", None) == 1
    channel.write(protocol.encode_answer(200, protocol.READY_ARRAYS if arrays else protocol.READY))
    handle_many, read, encode_answers = handler.handle_many, requests.read, protocol.encode_answers
    while (bodies := protocol.read_requests(read)) is not None:
        channel.write(encode_answers(handle_many(bodies)))


if __name__ == "__main__":
    main(sys.argv[1])
