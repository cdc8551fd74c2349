"""The model processes serving one deployment, and how requests are shared among them."""

import asyncio
import time

from deployments.runtime.access import Access
from deployments.runtime.metrics import Stats
from deployments.runtime.process import ModelProcess, ModelUnavailable, Request, fail_requests, stopped
from deployments.runtime.registry import Spec


class ModelPool:
    """The processes serving one deployment.

    Requests that arrive while every process is busy wait in `pending`; a process
    that frees up takes all of them (up to MAX_BATCH) in one frame, so under load
    the model predicts many rows per call instead of one. The pool grows to
    max_size processes while requests wait. A process that crashed or timed out
    is restarted by the next batch it is given.

    `arrays` says whether the gateway should decode plain numeric requests into array
    requests for this pool: its processes announced that their handler takes them, and the
    model has no feature names (those take rows as a DataFrame, from JSON).
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
        self.stats = Stats(spec.deployment_id)  # the runtime's own, labelled, once it tracks this version
        self.arrays = False

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
        self._started(process)
        if self.closed:
            process.stop()
            raise stopped()
        self._free(process)

    def _started(self, process: ModelProcess) -> None:
        self.stats.starts += 1
        # Every process runs the same handler; a signature without feature names' key is an old one: JSON.
        signature = self.spec.signature or {}
        self.arrays = process.arrays and "feature_names_in" in signature and signature["feature_names_in"] is None

    async def warm(self) -> None:
        if not self.processes:
            await self._start(self._new_process())

    async def predict(self, body: bytes, frame: bytes | None = None) -> tuple[int, bytes]:
        """The answer to a JSON `body`; `frame` is the same request as an array request, which
        processes that take them get instead (protocol.py)."""
        self.last_used = time.monotonic()
        if not self.processes:
            await self._start(self._new_process())
        request = Request(body, asyncio.get_running_loop().create_future(), frame)
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
            fail_requests(requests, stopped())
            return
        again = [request for request in requests if not request.retried]
        fail_requests([request for request in requests if request.retried], error)
        for request in again:
            request.retried = True
        self.pending[:0] = again

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending and self.idle:
            batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
            self.stats.batched(len(batch))
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
            self._started(process)
            if not self.closed:
                process.send(batch)
                return
        if self.closed:  # the deployment was stopped while its process restarted
            process.stop()
            failure = stopped()
        fail_requests(batch, failure)
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
        fail_requests(pending, error)
