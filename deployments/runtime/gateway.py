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
    digests = [key.key_sha256.encode() for key in deployment.keys.all() if key.revoked_at is None]
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


class ModelProcess:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.workdir: Path | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
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
        with open(logs / f"model-{self.spec.deployment_id}.log", "ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                # The id is only a label, so operators can tell model processes apart in `ps`.
                *iso.prefix, str(self.spec.python), "-I", "-B", "model_server.py", ".", self.spec.deployment_id,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                limit=2 * MAX_BODY,
                **sandbox_popen_kwargs(iso, self.workdir, settings.SERVEML_MODEL_MEMORY_BYTES, None),
            )
        try:
            status, body = await asyncio.wait_for(self._read(), timeout=settings.SERVEML_SANDBOX_WALL_SECONDS)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            code = self.stop()
            raise ModelUnavailable(503, f"the model process did not start (exit code {code})") from None
        if status != 200:
            self.stop()
            raise ModelUnavailable(503, body.decode(errors="replace"))
        log.info("model process %s started for %s (%s)", self.proc.pid, self.spec.deployment_id, iso.describe())

    async def _read(self) -> tuple[int, bytes]:
        size, status = struct.unpack(">IH", await self.proc.stdout.readexactly(6))
        return status, await self.proc.stdout.readexactly(size)

    async def call_many(self, bodies: list[bytes]) -> list[tuple[int, bytes]]:
        frames = [struct.pack(">I", len(bodies))]
        for body in bodies:
            frames.append(struct.pack(">I", len(body)))
            frames.append(body)
        self.proc.stdin.write(b"".join(frames))
        await self.proc.stdin.drain()
        return [await self._read() for _ in bodies]

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.returncode is None:
            kill_group(self.proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode if self.proc else None


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
        self.pending: list[tuple[bytes, asyncio.Future]] = []
        self.starting = 0
        self.last_used = time.monotonic()

    async def add_process(self) -> None:
        # Counted as starting from the moment it is asked for, so that requests arriving
        # meanwhile do not ask for more processes than max_size.
        self.starting += 1
        await self._start_process()

    async def _start_process(self) -> None:
        try:
            process = ModelProcess(self.spec)
            await process.start()
            self.processes.append(process)
            self.idle.append(process)
        finally:
            self.starting -= 1
        self._dispatch()

    async def warm(self) -> None:
        if not self.processes:
            await self.add_process()

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        self.last_used = time.monotonic()
        if not self.processes and not self.starting:
            await self.add_process()
        future = asyncio.get_running_loop().create_future()
        self.pending.append((body, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending and self.idle:
            batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
            loop.create_task(self._run(self.idle.pop(), batch))
        if self.pending and len(self.processes) + self.starting < self.max_size:
            self.starting += 1
            task = loop.create_task(self._start_process())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self, process: ModelProcess, batch: list[tuple[bytes, asyncio.Future]]) -> None:
        try:
            if not process.alive:
                # It crashed or timed out on an earlier request: restart it for these.
                process.stop()
                await process.start()
            answers = await asyncio.wait_for(
                process.call_many([body for body, _ in batch]), timeout=settings.SERVEML_PREDICT_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            process.stop()
            error = ModelUnavailable(
                504, f"the model took longer than {settings.SERVEML_PREDICT_TIMEOUT_S:g} s to answer; "
                "its process is restarted on the next request"
            )
            answers = None
        except (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError):
            code = process.stop()
            error = ModelUnavailable(
                502, f"the model process crashed while answering (exit code {code}); it is restarted on the next request"
            )
            answers = None
        except ModelUnavailable as exc:  # the restart failed
            error, answers = exc, None
        finally:
            self.idle.append(process)
        for index, (_, future) in enumerate(batch):
            if not future.done():
                if answers is None:
                    future.set_exception(error)
                else:
                    future.set_result(answers[index])
        self._dispatch()

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()
        self.idle.clear()
        for _, future in self.pending:
            if not future.done():
                future.set_exception(ModelUnavailable(404, "the deployment was stopped"))
        self.pending.clear()


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
        idle = [d for d, pool in self.pools.items() if not pool.pending and now - pool.last_used > idle_seconds]
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
        if len(parts) != 2 or not _is_uuid(parts[1]):
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
