"""One long-lived model process and the pipe the runtime talks to it through.

A model process is model_server.py, run by the deployment's environment
interpreter inside the sandbox: forked from the environment's warm template
(runtime/templates.py), or, with SERVEML_TEMPLATES off, started on its own. It
is started once and then fed batches of request bodies, exactly as clients sent
them, or, when its handler announced that it takes them, plain numeric requests as
array requests; its answers come back in order (deployments/runtime/protocol.py has
the frame formats).
"""

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from deployments import buildkit, sandbox
from deployments.runtime import protocol, templates
from deployments.runtime.registry import Spec
from deployments.sandbox import kill_group

log = logging.getLogger("serveml.runtime")
# What a model process's /work holds besides its deployment's build context: the server
# loop and the frame format it shares with this side (copied in: they are ServeML's files).
MODEL_SERVER_FILES = {"model_server.py": buildkit.MODEL_SERVER, "protocol.py": Path(protocol.__file__)}
# From the build context, bound read-only without a copy (the package stage made them 0444).
# Not serveml_v2.py: the runtime translates V2 itself, and contexts built before it lack it.
BUILD_FILES = ("serveml_handler.py", "serveml_loader.py", buildkit.CONFIG_FILE)


class ModelUnavailable(Exception):
    """Why a request got no answer from the model; `status` is what the client is told."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def stopped() -> ModelUnavailable:
    return ModelUnavailable(404, "the deployment was stopped")


@dataclass(slots=True)
class Request:
    body: bytes
    future: asyncio.Future
    frame: bytes | None = None  # the same request as an array request, for processes that take them
    retried: bool = False  # a process died holding it once already


def fail_requests(requests: list[Request], error: ModelUnavailable) -> None:
    for request in requests:
        if not request.future.done():  # its client may have gone away
            request.future.set_exception(error)


class _Channel:
    """Splits a model process's answers into frames as the bytes arrive.

    A protocol rather than a StreamReader: each answer resolves its request's future
    right here, with no task, timeout wrapper or read coroutine per request."""

    def __init__(self, process: "ModelProcess"):
        self.process = process
        self.buffer = bytearray()

    def received(self, data: bytes) -> None:
        if self.process.channel is not self:
            return
        buffer = self.buffer
        buffer += data
        offset = 0
        try:
            while (answer := protocol.decode_answer(buffer, offset)) is not None:
                status, body, offset = answer
                self.process.answered(status, body)
        except protocol.AnswerTooLarge as exc:
            buffer.clear()
            self.process.channel = None  # whatever else it writes is dropped, not buffered
            self.process.answer_too_large(exc.size)
            return
        del buffer[:offset]

    def ended(self) -> None:
        if self.process.channel is self:  # not a process that was already replaced
            self.process.exited()


class _PipeChannel(_Channel, asyncio.SubprocessProtocol):
    """A process started on its own: answers on its stdout pipe."""

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.received(data)

    def process_exited(self) -> None:
        self.ended()


class _ForkChannel(_Channel, asyncio.Protocol):
    """A process forked from a template: answers on its answer pipe, whose end means the
    process is gone (or closed it, and is killed)."""

    def __init__(self, process: "ModelProcess"):
        super().__init__(process)
        self.call_soon = asyncio.get_running_loop().call_soon

    def data_received(self, data: bytes) -> None:
        # Handled after the rest of this turn of the event loop, as uvloop hands over a
        # subprocess's output: requests that arrived in the same turn are queued by then, and
        # the process freed by these answers takes them all in its next batch. Handled at once,
        # the batches were smaller: ~20% fewer requests/s at concurrency 8 (bench/metrics_cost.py).
        self.call_soon(self.received, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.ended()


class ModelProcess:
    """One long-lived model process and the requests it is answering.

    `send` writes a batch in one frame; answers come back in order and resolve the
    requests' futures; once all are in, `on_free` hands the process back to its pool.
    If it dies before answering them all, `on_lost` gets the rest back.
    """

    def __init__(self, spec: Spec, on_free=lambda process: None, on_lost=None):
        self.spec = spec
        self.on_free = on_free
        self.on_lost = on_lost or (lambda requests, error: fail_requests(requests, error))
        self.transport: asyncio.SubprocessTransport | None = None  # started on its own
        self.forked: templates.Forked | None = None  # or forked from a template
        self.template: templates.Template | None = None
        self.writer: asyncio.WriteTransport | None = None  # its requests' way in
        self.reader: asyncio.ReadTransport | None = None  # a forked process's answers' way out
        self.channel: _Channel | None = None
        self.stopped = False
        self.loaded: asyncio.Future | None = None
        self.waiting: deque[Request] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.launched: sandbox.Launch | None = None
        self.isolation = ""  # how the sandbox held it, for the log
        self.arrays = False  # its handler takes array requests (it said so when it loaded)

    @property
    def alive(self) -> bool:
        if self.stopped:
            return False
        if self.forked is not None:
            return self.writer is not None and not self.writer.is_closing()
        return self.transport is not None and self.transport.get_returncode() is None

    @property
    def pid(self) -> int | None:
        """Its pid on the host (the sandbox's outermost process when it started on its own)."""
        if self.forked is not None:
            return self.forked.pid
        return self.transport.get_pid() if self.transport else None

    @property
    def returncode(self) -> int | None:
        """Its exit code; None while it runs, and for a forked process, whose parent is the template."""
        return self.transport.get_returncode() if self.transport else None

    async def start(self) -> None:
        self.stopped, self.transport, self.forked, self.writer, self.reader = False, None, None, None, None
        loop = asyncio.get_running_loop()
        try:
            if templates.enabled():
                await self._fork(loop)
            else:
                self.transport = await self._spawn(loop)
                self.writer = self.transport.get_pipe_transport(0)
        except ModelUnavailable:
            self.stop()
            raise
        if self.stopped:  # stop() came while it was being spawned
            self.stop()
            raise ModelUnavailable(503, "the model process was stopped while it started")
        try:
            await self._until_loaded()
        except ModelUnavailable:
            self.stop()
            raise
        log.info("model process %s started for %s (%s)", self.pid, self.spec.deployment_id, self.isolation)

    @staticmethod
    def limits() -> sandbox.Limits:
        return sandbox.Limits(
            memory_bytes=settings.SERVEML_MODEL_MEMORY_BYTES,
            # Long-lived: each request has a wall-clock limit; this recycles a process that
            # has used an hour of CPU (its requests go once more to a fresh one).
            cpu_seconds=settings.SERVEML_MODEL_CPU_SECONDS,
        )

    def _files(self) -> dict[str, Path]:
        build = self.spec.build_dir
        return {**{name: build / name for name in BUILD_FILES}, self.spec.model_path.name: self.spec.model_path}

    async def _fork(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fork model_server.py from the warm template of the deployment's environment
        (runtime/templates.py), which isolates it before it reads the model."""
        try:
            template = await templates.shared.get(self.spec.environment, self.spec.owner)
        except templates.TemplateUnavailable as exc:
            raise ModelUnavailable(503, f"the model process could not start: {exc}") from None
        limits = self.limits()
        logs = settings.DATA_DIR / "logs"
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        opened: dict[str, int] = {}
        # Two pipes, as a process started alone has: over one socket, asyncio's socket transport
        # cost the gateway ~4 µs more per request, ~13% of requests/s at concurrency 8 here.
        requests_in, requests_out = os.pipe()
        answers_in, answers_out = os.pipe()
        try:
            for name, path in self._files().items():
                sandbox.check_name(name)
                opened[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                # It reads them again through /proc/self/fd as the deployment's uid, as a bind would.
                if not os.fstat(opened[name]).st_mode & 0o004:
                    raise ValueError(f"{path} is handed to a model process without a copy: it must be world-readable")
            log_path = logs / f"model-{self.spec.deployment_id}.log"
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            opened["log"] = log_fd
            self.forked = await template.fork(
                uid=self.spec.uid,
                label=self.spec.deployment_id,
                limits=limits,
                requests=requests_in,
                answers=answers_out,
                log_fd=log_fd,
                files={name: fd for name, fd in opened.items() if name != "log"},
            )
        except (OSError, ValueError, templates.TemplateUnavailable) as exc:
            os.close(requests_out)
            os.close(answers_in)
            raise ModelUnavailable(503, f"the model process could not start: {exc}") from None
        finally:
            for fd in (requests_in, answers_out, *opened.values()):
                os.close(fd)  # the model process has its own copies
        self.template = template
        self.isolation = (
            f"forked from the warm template of environment {self.spec.environment.name}: own uid, PID, mount, "
            f"network and IPC namespaces, no capabilities; memory {limits.memory_bytes // 1024**2} MiB"
        )
        self.loaded = loop.create_future()
        self.channel = channel = _ForkChannel(self)
        self.reader, _ = await loop.connect_read_pipe(lambda: channel, os.fdopen(answers_in, "rb", buffering=0))
        self.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(requests_out, "wb", buffering=0))

    async def _spawn(self, loop: asyncio.AbstractEventLoop) -> asyncio.SubprocessTransport:
        """Start model_server.py in the deployment's sandbox: the one place that knows how."""
        limits = self.limits()
        try:
            launched = sandbox.launch(
                uid=self.spec.uid,
                environment=self.spec.environment,
                limits=limits,
                # The id is only a label, so operators can tell model processes apart in `ps`.
                args=["model_server.py", ".", self.spec.deployment_id],
                files=MODEL_SERVER_FILES,
                binds=self._files(),
            )
        except (sandbox.SandboxUnavailable, OSError, ValueError) as exc:  # e.g. its build was deleted
            raise ModelUnavailable(503, f"the model process could not start: {exc}") from None
        logs = settings.DATA_DIR / "logs"
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.loaded = loop.create_future()
        self.channel = channel = _PipeChannel(self)
        self.isolation = sandbox.describe(limits)
        try:
            with open(logs / f"model-{self.spec.deployment_id}.log", "ab") as stderr:
                transport, _ = await loop.subprocess_exec(
                    lambda: channel,
                    *launched.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=stderr,
                    **launched.popen_kwargs(),
                )
        except OSError as exc:  # e.g. its environment was deleted: redeploy it
            launched.close()
            raise ModelUnavailable(503, f"the model process could not start: {exc}") from None
        launched.started()
        self.launched = launched  # closed by stop(): with the sandbox off, it owns the working folder
        return transport

    async def _until_loaded(self) -> None:
        """Wait for the first frame: the model is loaded (200), or why it is not."""
        try:
            async with asyncio.timeout(settings.SERVEML_SANDBOX_WALL_SECONDS):
                status, body = await self.loaded
        except TimeoutError:
            raise ModelUnavailable(
                503, f"the model process did not load the model in {settings.SERVEML_SANDBOX_WALL_SECONDS} s"
            ) from None
        if status != 200:
            raise ModelUnavailable(503, body.decode(errors="replace"))
        self.arrays = body == protocol.READY_ARRAYS

    def send(self, batch: list[Request]) -> None:
        self.waiting.extend(batch)
        if self.arrays:
            bodies = [request.body if request.frame is None else request.frame for request in batch]
        else:
            bodies = [request.body for request in batch]
        self.writer.write(protocol.encode_requests(bodies))
        timeout = settings.SERVEML_PREDICT_TIMEOUT_S
        self.timer = asyncio.get_running_loop().call_later(
            timeout,
            self.fail,
            ModelUnavailable(
                504, f"the model took longer than {timeout:g} s to answer; its process is restarted on the next request"
            ),
        )

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

    def answer_too_large(self, size: int) -> None:
        """It announced an answer over protocol.MAX_ANSWER_BYTES: treated as a crash, so the
        process is killed before any of that answer is buffered."""
        limit = protocol.MAX_ANSWER_BYTES // 1024**2
        if not self.loaded.done():
            self.stop()
            self.loaded.set_exception(
                ModelUnavailable(503, f"the model process wrote more than {limit} MB while it loaded the model")
            )
            return
        self.fail(
            ModelUnavailable(
                502,
                f"the model's answer was larger than {limit} MB ({size} bytes); "
                "its process is restarted on the next request",
            )
        )

    def exited(self) -> None:
        code = "" if self.returncode is None else f" (exit code {self.returncode})"
        if self.forked is not None:
            self._end_fork()  # its socket closed: make sure it is gone
        if not self.loaded.done():
            self.loaded.set_exception(
                ModelUnavailable(503, f"the model process exited before it loaded the model{code}")
            )
        elif self.waiting:
            self.fail(
                ModelUnavailable(
                    502,
                    f"the model process crashed while answering{code}; it is restarted on the next request",
                ),
                lost=True,
            )

    def fail(self, error: ModelUnavailable, lost: bool = False) -> None:
        """Stop the process and answer every request in flight with `error`, or, when it
        died on its own (`lost`), hand them to `on_lost`."""
        waiting, self.waiting = list(self.waiting), deque()
        self.stop()
        if lost:
            self.on_lost(waiting, error)
        else:
            fail_requests(waiting, error)
        if waiting:
            self._free()

    def _free(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.on_free(self)

    def _end_fork(self) -> None:
        if self.forked.pidfd >= 0:
            self.forked.kill()
            self.forked.close()
            self.template.released()
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None:
            self.reader.close()

    def stop(self) -> int | None:
        self.stopped = True
        if self.forked is not None:
            self._end_fork()
        if self.transport is not None:
            if self.transport.get_returncode() is None:  # not reaped yet, so its pid is still its own
                kill_group(self.transport.get_pid())
            self.transport.close()
        if self.launched is not None:
            self.launched.close()
            self.launched = None
        return self.returncode
