"""The local runtime: an ASGI app that answers prediction URLs.

Each deployment gets a pool of long-lived model processes (model_server.py,
run by the deployment's environment interpreter inside the sandbox) that are
started once and then fed requests over pipes: no process is started per
request, and the request body reaches the handler exactly as the client sent
it. Requests that arrive while the processes are busy are handed over together
and predicted in one vectorised call. A process that crashes is replaced on
the next request; a deployment that stops being servable is unloaded by a
periodic sweep, so a stopped URL answers 404 even when the worker could not
reach the runtime; a deployment nobody calls scales to zero.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import shutil
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from deployments import buildkit
from deployments.sandbox import isolation_for, kill_group, private_workdir, sandbox_popen_kwargs

log = logging.getLogger("serveml.runtime")
MAX_BODY = 10 * 1024 * 1024
JSON = [(b"content-type", b"application/json")]


class ModelUnavailable(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Access:
    """Who may call a deployment: anyone, or holders of one of its keys (SHA-256 digests)."""

    private: bool = False
    key_digests: frozenset[bytes] = frozenset()

    def allows(self, headers: dict[bytes, bytes], internal_token: bytes) -> bool:
        if not self.private:
            return True
        if hmac.compare_digest(headers.get(b"x-serveml-internal", b""), internal_token):
            return True
        presented = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        if not presented:
            return False
        digest = hashlib.sha256(presented).hexdigest().encode()
        # Compare against every key, without stopping early, in constant time each.
        matches = [hmac.compare_digest(digest, known) for known in self.key_digests]
        return any(matches)


def _access(deployment) -> Access:
    digests = [key.key_sha256.encode() for key in deployment.keys.all() if key.is_active()]
    return Access(deployment.is_private, frozenset(digests))


@dataclass(frozen=True)
class Spec:
    """Where a servable deployment's pieces live on this host."""

    deployment_id: str
    python: Path
    build_dir: Path
    model_path: Path


def lookup(deployment_id: str) -> tuple[Spec, Access] | None:
    """Read a servable deployment from the database (runs in a thread)."""
    from deployments.models import Deployment
    from deployments.pipeline.stages import environment_python, restore_context

    close_old_connections()
    servable = [Deployment.Status.READY, Deployment.Status.DEPLOYING]
    deployment = Deployment.objects.filter(
        public_id=deployment_id, status__in=servable, target=Deployment.Target.LOCAL
    ).exclude(environment_key="").exclude(artifact="").first()
    if deployment is None:
        return None
    build_dir = restore_context(deployment)
    spec = Spec(deployment_id, environment_python(deployment), build_dir, build_dir / deployment.model_basename())
    return spec, _access(deployment)


def servable_access(ids: list[str]) -> dict[str, Access]:
    """The access rules of those deployments that may still be served (runs in a thread)."""
    from deployments.models import Deployment

    close_old_connections()
    rows = Deployment.objects.filter(
        public_id__in=ids, status__in=[Deployment.Status.READY, Deployment.Status.DEPLOYING]
    ).prefetch_related("keys")
    return {str(row.public_id): _access(row) for row in rows}


FRAME = struct.Struct(">IH")  # an answer from a model process: body length, HTTP status


@dataclass(slots=True)
class Request:
    body: bytes
    future: asyncio.Future
    retried: bool = False  # a process died holding it once already


class _Channel(asyncio.SubprocessProtocol):
    """Splits a model process's stdout into answer frames as the bytes arrive.

    A protocol rather than a StreamReader: each answer resolves its request's future
    right here, with no task, timeout wrapper or read coroutine per request."""

    def __init__(self, process: "ModelProcess"):
        self.process = process
        self.buffer = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1 or self.process.channel is not self:
            return
        buffer = self.buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= FRAME.size:
            size, status = FRAME.unpack_from(buffer, offset)
            end = offset + FRAME.size + size
            if len(buffer) < end:
                break
            self.process.answered(status, bytes(buffer[offset + FRAME.size : end]))
            offset = end
        del buffer[:offset]

    def process_exited(self) -> None:
        if self.process.channel is self:  # not a process that was already replaced
            self.process.exited()


class ModelProcess:
    """One long-lived model process and the requests it is answering.

    `send` writes a batch in one frame; answers come back in order and resolve the
    requests' futures; once all are in, `on_free` hands the process back to its pool.
    If it dies before answering them all, `on_lost` gets the rest back.
    """

    def __init__(self, spec: Spec, on_free=lambda process: None, on_lost=None):
        self.spec = spec
        self.on_free = on_free
        self.on_lost = on_lost or (lambda requests, error: _fail(requests, error))
        self.transport: asyncio.SubprocessTransport | None = None
        self.channel: _Channel | None = None
        self.stopped = False
        self.loaded: asyncio.Future | None = None
        self.waiting: deque[Request] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.workdir: Path | None = None

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.stopped and self.transport.get_returncode() is None

    @property
    def returncode(self) -> int | None:
        return self.transport.get_returncode() if self.transport else None

    async def start(self) -> None:
        self.stopped, self.transport = False, None
        iso = isolation_for(
            python=self.spec.python,
            memory_bytes=settings.SERVEML_MODEL_MEMORY_BYTES,
            cpu_seconds=None,  # long-lived: a per-request wall-clock limit applies instead
        )
        self.workdir = private_workdir(iso, {
            "model_server.py": buildkit.MODEL_SERVER,
            "handler.py": self.spec.build_dir / "handler.py",
            self.spec.model_path.name: self.spec.model_path,
        })
        logs = settings.DATA_DIR / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self.loaded = loop.create_future()
        self.channel = channel = _Channel(self)
        try:
            with open(logs / f"model-{self.spec.deployment_id}.log", "ab") as stderr:
                self.transport, _ = await loop.subprocess_exec(
                    lambda: channel,
                    # The id is only a label, so operators can tell model processes apart in `ps`.
                    *iso.prefix, str(self.spec.python), "-I", "-B", "model_server.py", ".", self.spec.deployment_id,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                    **sandbox_popen_kwargs(iso, self.workdir, settings.SERVEML_MODEL_MEMORY_BYTES, None),
                )
        except OSError as exc:  # e.g. its environment was deleted: redeploy it
            self.stop()
            raise ModelUnavailable(503, f"the model process could not start: {exc}") from None
        if self.stopped:  # stop() came while it was being spawned
            self.stop()
            raise ModelUnavailable(503, "the model process was stopped while it started")
        try:
            async with asyncio.timeout(settings.SERVEML_SANDBOX_WALL_SECONDS):
                status, body = await self.loaded
        except TimeoutError:
            self.stop()
            raise ModelUnavailable(503, "the model process did not load the model in "
                                        f"{settings.SERVEML_SANDBOX_WALL_SECONDS} s") from None
        except ModelUnavailable:  # it exited while loading
            self.stop()
            raise
        if status != 200:
            self.stop()
            raise ModelUnavailable(503, body.decode(errors="replace"))
        log.info("model process %s started for %s (%s)", self.transport.get_pid(), self.spec.deployment_id,
                 iso.describe())

    def send(self, batch: list[Request]) -> None:
        frames = [struct.pack(">I", len(batch))]
        for request in batch:
            frames.append(struct.pack(">I", len(request.body)))
            frames.append(request.body)
        self.waiting.extend(batch)
        self.transport.get_pipe_transport(0).write(b"".join(frames))
        timeout = settings.SERVEML_PREDICT_TIMEOUT_S
        self.timer = asyncio.get_running_loop().call_later(timeout, self.fail, ModelUnavailable(
            504, f"the model took longer than {timeout:g} s to answer; its process is restarted on the next request"
        ))

    def answered(self, status: int, body: bytes) -> None:
        if not self.loaded.done():
            self.loaded.set_result((status, body))
            return
        if not self.waiting:
            return  # answers to requests already failed (timed out)
        future = self.waiting.popleft().future
        if not future.done():  # its client may have gone away
            future.set_result((status, body))
        if not self.waiting:
            self._free()

    def exited(self) -> None:
        code = self.returncode
        if not self.loaded.done():
            self.loaded.set_exception(ModelUnavailable(
                503, f"the model process exited before it loaded the model (exit code {code})"
            ))
        elif self.waiting:
            self.fail(ModelUnavailable(
                502, f"the model process crashed while answering (exit code {code}); "
                "it is restarted on the next request"
            ), lost=True)

    def fail(self, error: ModelUnavailable, lost: bool = False) -> None:
        """Stop the process and answer every request in flight with `error`, or, when it
        died on its own (`lost`), hand them to `on_lost`."""
        waiting, self.waiting = list(self.waiting), deque()
        self.stop()
        if lost:
            self.on_lost(waiting, error)
        else:
            _fail(waiting, error)
        if waiting:
            self._free()

    def _free(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.on_free(self)

    def stop(self) -> int | None:
        self.stopped = True
        if self.transport is not None:
            if self.transport.get_returncode() is None:  # not reaped yet, so its pid is still its own
                kill_group(self.transport.get_pid())
            self.transport.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return self.returncode


class ModelPool:
    """The processes serving one deployment.

    Requests that arrive while every process is busy wait in `pending`; a process
    that frees up takes all of them (up to MAX_BATCH) in one frame, so under load
    the model predicts many rows per call instead of one. The pool grows to
    max_size processes while requests wait.
    """

    MAX_BATCH = 64

    def __init__(self, spec: Spec, access: Access, max_size: int):
        self.spec = spec
        self.access = access
        self.max_size = max_size
        self.processes: list[ModelProcess] = []
        self.idle: list[ModelProcess] = []
        self.pending: list[Request] = []
        self.closed = False
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        """Requests wait for a process, or a process is answering some (they may outlast the idle timeout)."""
        return bool(self.pending) or any(process.waiting for process in self.processes)

    def _new_process(self) -> ModelProcess:
        # Counted from the moment it is asked for, so that requests arriving while it loads
        # do not ask for more than max_size processes, and close() can stop it.
        process = ModelProcess(self.spec, on_free=self._free, on_lost=self._lost)
        self.processes.append(process)
        return process

    async def _start(self, process: ModelProcess) -> None:
        try:
            await process.start()
        except BaseException as exc:
            if process in self.processes:
                self.processes.remove(process)
            if isinstance(exc, ModelUnavailable):
                if self.closed:
                    raise stopped() from None  # it was killed because the deployment was stopped
                if not self.processes:
                    # No process will ever take the requests that wait: tell them why.
                    self._fail_pending(exc)
            raise
        if self.closed:
            process.stop()
            raise stopped()
        self._free(process)

    async def warm(self) -> None:
        if not self.processes:
            await self._start(self._new_process())

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        self.last_used = time.monotonic()
        if not self.processes:
            await self._start(self._new_process())
        request = Request(body, asyncio.get_running_loop().create_future())
        self.pending.append(request)
        self._dispatch()
        return await request.future

    def _free(self, process: ModelProcess) -> None:
        if not self.closed:
            self.idle.append(process)
            self._dispatch()

    def _lost(self, requests: list[Request], error: ModelUnavailable) -> None:
        """A process died holding these. It may have died before it read them (killed while
        idle, say): each goes once more to a fresh process; a second death answers `error`."""
        if self.closed:
            _fail(requests, stopped())
            return
        again = [request for request in requests if not request.retried]
        _fail([request for request in requests if request.retried], error)
        for request in again:
            request.retried = True
        self.pending[:0] = again

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending and self.idle:
            batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
            process = self.idle.pop()
            if process.alive:
                process.send(batch)
            else:  # it crashed or timed out on an earlier request: restart it for these
                loop.create_task(self._restart(process, batch))
        if self.pending and len(self.processes) < self.max_size:
            task = loop.create_task(self._start(self._new_process()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _restart(self, process: ModelProcess, batch: list[Request]) -> None:
        process.stop()
        try:
            await process.start()
        except ModelUnavailable as exc:
            failure = exc
        else:
            if not self.closed:
                process.send(batch)
                return
        if self.closed:  # the deployment was stopped while its process restarted
            process.stop()
            failure = stopped()
        _fail(batch, failure)
        self._free(process)

    def close(self) -> None:
        self.closed = True
        for process in self.processes:
            process.fail(stopped())
        self.processes.clear()
        self.idle.clear()
        self._fail_pending(stopped())

    def _fail_pending(self, error: ModelUnavailable) -> None:
        pending, self.pending = self.pending, []
        _fail(pending, error)


def stopped() -> ModelUnavailable:
    return ModelUnavailable(404, "the deployment was stopped")


def _fail(requests: list[Request], error: ModelUnavailable) -> None:
    for request in requests:
        if not request.future.done():  # its client may have gone away
            request.future.set_exception(error)


class Runtime:
    """The ASGI application."""

    def __init__(self, max_processes: int | None = None, sweep_seconds: float = 2.0):
        self.pools: dict[str, ModelPool] = {}
        self.loading: dict[str, asyncio.Lock] = {}
        # One core stays with this gateway process: on 2 cores, one model process that
        # takes whole batches beat two that each took half of them (bench/README.md).
        self.max_processes = max_processes or max(1, (os.cpu_count() or 1) - 1)
        self.sweep_seconds = sweep_seconds
        self.token = settings.SERVEML_RUNTIME_TOKEN.encode()

    async def pool_for(self, deployment_id: str) -> ModelPool | None:
        pool = self.pools.get(deployment_id)
        if pool is not None:
            return pool
        lock = self.loading.setdefault(deployment_id, asyncio.Lock())
        async with lock:
            if deployment_id in self.pools:
                return self.pools[deployment_id]
            found = await sync_to_async(lookup)(deployment_id)
            if found is None:
                return None
            pool = ModelPool(*found, self.max_processes)
            await pool.warm()
            self.pools[deployment_id] = pool
            return pool

    def unload(self, deployment_id: str) -> bool:
        pool = self.pools.pop(deployment_id, None)
        if pool:
            pool.close()
        return pool is not None

    async def refresh(self, ids: list[str]) -> None:
        """Re-read access rules, and unload deployments that may no longer be served."""
        keep = await sync_to_async(servable_access)(ids)
        for deployment_id in ids:
            pool = self.pools.get(deployment_id)
            if pool is None:
                continue
            if deployment_id in keep:
                pool.access = keep[deployment_id]
            else:
                log.info("unloading %s: no longer servable", deployment_id)
                self.unload(deployment_id)

    def scale_to_zero(self, now: float | None = None) -> list[str]:
        """Stop the model processes of deployments idle for longer than the idle timeout."""
        idle_seconds = settings.SERVEML_MODEL_IDLE_SECONDS
        if not idle_seconds:
            return []
        now = time.monotonic() if now is None else now
        idle = [d for d, pool in self.pools.items() if not pool.busy and now - pool.last_used > idle_seconds]
        for deployment_id in idle:
            log.info("stopping the model processes of %s: idle for %g s", deployment_id, idle_seconds)
            self.unload(deployment_id)
        return idle

    async def sweep(self) -> None:
        """Catch changes the runtime was not told about (it was down, or a call failed)."""
        while True:
            await asyncio.sleep(self.sweep_seconds)
            self.scale_to_zero()
            if self.pools:
                try:
                    await self.refresh(list(self.pools))
                except Exception:
                    log.exception("sweep failed")

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        parts = path.strip("/").split("/")
        if path == "/health":
            return await respond(send, 200, orjson.dumps({"status": "ok", "loaded": len(self.pools)}))
        if len(parts) != 2 or (parts[1] not in self.pools and not _is_uuid(parts[1])):
            return await respond(send, 404, _error("no deployment answers at this URL"))
        if parts[0] == "predict":
            if method != "POST":
                return await respond(send, 405, _error("send predictions with POST and a JSON body"))
            return await self.predict(parts[1], dict(scope["headers"]), receive, send)
        if parts[0] in ("_load", "_unload", "_refresh") and method == "POST":
            return await self.control(parts[0], parts[1], scope, send)
        return await respond(send, 404, _error("no deployment answers at this URL"))

    async def predict(self, deployment_id: str, headers: dict, receive, send):
        body = await read_body(receive)
        if body is None:
            return await respond(send, 413, _error(f"request body is larger than {MAX_BODY // 1024**2} MB"))
        try:
            pool = await self.pool_for(deployment_id)
            if pool is None:
                return await respond(
                    send, 404, _error("no deployment answers at this URL: it does not exist or was stopped")
                )
            if not pool.access.allows(headers, self.token):
                return await respond(send, 401, _error(
                    "this endpoint is private: send one of its API keys as `Authorization: Bearer <key>` "
                    "or `X-API-Key: <key>` (the deployment's owner creates keys on its page)"
                ))
            status, answer = await pool.predict(body)
        except ModelUnavailable as exc:
            return await respond(send, exc.status, _error(exc.message))
        await respond(send, status, answer)

    async def control(self, action: str, deployment_id: str, scope, send):
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, b"Bearer " + self.token):
            return await respond(send, 403, _error("bad runtime token"))
        if action == "_unload":
            return await respond(send, 200, orjson.dumps({"unloaded": self.unload(deployment_id)}))
        if action == "_refresh":
            await self.refresh([deployment_id])
            return await respond(send, 200, orjson.dumps({"refreshed": deployment_id in self.pools}))
        try:
            pool = await self.pool_for(deployment_id)
        except ModelUnavailable as exc:
            return await respond(send, exc.status, _error(exc.message))
        if pool is None:
            return await respond(send, 404, _error("the deployment is not ready to be served"))
        return await respond(send, 200, orjson.dumps({"loaded": deployment_id, "processes": len(pool.processes)}))

    async def lifespan(self, receive, send):
        sweeper = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                sweeper = asyncio.get_running_loop().create_task(self.sweep())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if sweeper:
                    sweeper.cancel()
                for deployment_id in list(self.pools):
                    self.unload(deployment_id)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _error(message: str) -> bytes:
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


async def respond(send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": JSON + [(b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
