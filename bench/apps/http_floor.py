"""The transport floor: an ASGI app that reads the request and answers a constant.

Run with the uvicorn (httptools, uvloop) that ServeML's runtime uses:
`uvicorn http_floor:app`. Whatever any server spends on a request beyond this
and the model's own `predict` is its own overhead.
"""

ANSWER = b'{"prediction":0,"model_type":"none"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
