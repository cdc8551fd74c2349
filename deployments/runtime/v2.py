"""The runtime's Open Inference Protocol (V2 REST) endpoints.

`/v2/...` requests are translated by the shared buildkit/serveml_v2.py into ServeML
requests and go to the deployment's pool like any `POST /predict/<id>`: the same model
processes, batching, private-endpoint keys and errors (401/404/413/502/504). Model
metadata comes from the signature the validate stage recorded.
"""

import asyncio
import time

import orjson

from deployments.buildkit import serveml_v2
from deployments.buildkit.serveml_v2 import V2Error
from deployments.runtime import asgi, metrics
from deployments.runtime.process import ModelUnavailable


async def serve(runtime, scope, receive, send) -> None:
    started = time.perf_counter()
    headers = dict(scope["headers"])
    try:
        action, deployment_id, version = serveml_v2.route(scope["method"], scope["path"], versions=True)
        if deployment_id is None:  # the server's own: metadata, live, ready
            if action == "server":
                return await asgi.respond(send, 200, orjson.dumps(serveml_v2.server_metadata()))
            return await asgi.respond(send, 200, b"")  # the status code is the answer
        body = None
        if action == "infer":
            body = await asgi.read_body(receive)
            if body is None:
                raise V2Error(f"request body is larger than {asgi.MAX_BODY // 1024**2} MB", 413)
        pool = await runtime.pool_with_access(deployment_id, headers, version)
        if action == "ready":
            return await asgi.respond(send, 200, b"")
        model = serveml_v2.describe(pool.spec.signature, pool.spec.example)
        if action == "metadata":
            return await asgi.respond(send, 200, orjson.dumps(serveml_v2.model_metadata(deployment_id, model)))
        status, answer, extra = await metrics.counted(
            pool.stats, started, infer(pool, deployment_id, model, headers, body)
        )
    except V2Error as exc:
        return await asgi.respond(send, exc.status, asgi.error(exc.message))
    except ModelUnavailable as exc:
        return await asgi.respond(send, exc.status, asgi.error(exc.message))
    await asgi.respond(send, status, answer, extra)


async def infer(pool, deployment_id: str, model: dict, headers: dict, body: bytes):
    body = serveml_v2.decompress(body, headers.get(b"content-encoding", b"").decode("latin-1"))
    header_length = headers.get(b"inference-header-content-length")
    request = serveml_v2.parse(body, header_length and header_length.decode("latin-1"), _loads)
    rows, outputs = serveml_v2.plan(request, model)
    # One ServeML request per method, each through the pool's batching like any other request.
    answers = await asyncio.gather(
        *(pool.predict(orjson.dumps(serveml_v2.serveml_request(rows, method))) for method, _ in outputs)
    )
    decoded = []
    for status, answer in answers:
        if status != 200:
            return status, answer, None  # the handler's own {"error": ...}
        decoded.append(orjson.loads(answer))
    response, chunks = serveml_v2.response(deployment_id, request, outputs, decoded)
    headers_out, out = serveml_v2.encode(response, chunks, orjson.dumps)
    pool.stats.rows += len(rows)  # the batch dimension, once however many outputs were asked for
    return 200, out, headers_out


def _loads(data):
    """JSON of sane depth only: the binary extension's header was not checked as a whole body was."""
    value = orjson.loads(data)
    if asgi.nested_deeper_than(value, asgi.MAX_DEPTH):
        raise V2Error(f"request body is nested deeper than {asgi.MAX_DEPTH} levels")
    return value
