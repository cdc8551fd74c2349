"""The local runtime: an ASGI app that answers prediction URLs.

Each deployment gets a pool of long-lived model processes (pool.py, process.py)
that are started once and then fed requests over pipes: no process is started
per request, and the request body reaches the handler exactly as the client sent
it, once the runtime has checked that it is JSON of sane depth; plain numeric rows
go as the float64 values this check decoded (an array request, protocol.py) to
model processes whose handler takes them. A process that
crashes is replaced on the next request; a deployment that stops being servable
is unloaded by a periodic sweep, so a stopped URL answers 404 even when the
worker could not reach the runtime; a deployment nobody calls scales to zero.

Besides `/predict/<id>`, `/v2/...` (the Open Inference Protocol, runtime/v2.py) and
`/health`, the worker drives `/_load`, `/_unload` and `/_refresh` (runtime/client.py),
with the runtime token; `/metrics` (Prometheus text) and `/_figures` (the web page's)
need it too (runtime/metrics.py: every request to a deployment is counted there).
"""

import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings

from deployments.runtime import memory, templates, v2
from deployments.runtime.asgi import MAX_BODY, canonical_uuid, check_prediction, error, read_body, respond
from deployments.runtime.metrics import Metrics
from deployments.runtime.pool import ModelPool
from deployments.runtime.process import ModelUnavailable
from deployments.runtime.registry import (
    RecentMisses,
    canaries,
    lookup,
    lookup_canary,
    lookup_shadow,
    lookup_version,
    openapi_document,
    servable_access,
    serving,
    shadows,
)
from deployments.runtime.shadow import Shadow

log = logging.getLogger("serveml.runtime")
# The memory budget is checked every this many sweeps (a /proc pass over every model process).
BUDGET_EVERY = 5


class KeyedLocks:
    """One lock per deployment id being loaded, dropped when the last holder or waiter
    lets go: anyone may ask for any UUID, so no lock may outlive its requests."""

    def __init__(self):
        self.entries: dict[str, list] = {}  # id -> [lock, how many hold or wait for it]

    def __len__(self) -> int:
        return len(self.entries)

    @asynccontextmanager
    async def hold(self, key: str):
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self.entries[key]


class Canary:
    """A share of a deployment's stable URL's requests answered by another ready version. Request i
    (counted per deployment) goes to it when (i * percent) % 100 < percent: every 100 requests in a
    row send exactly `percent` of them there, spread out (20: every fifth), with no randomness."""

    __slots__ = ("version_id", "percent", "count")

    def __init__(self, version_id: str, percent: int):
        self.version_id, self.percent, self.count = version_id, percent, 0

    def take(self) -> bool:
        i = self.count
        self.count = (i + 1) % 100
        return i * self.percent % 100 < self.percent


class Runtime:
    """The ASGI application."""

    def __init__(self, max_processes: int | None = None, sweep_seconds: float = 2.0):
        self.pools: dict[str, ModelPool] = {}  # by the id of the deployment or version they run
        # A deployment's id -> the version whose pool answers its stable URL (none: its own pool).
        self.routes: dict[str, str] = {}
        self.canaries: dict[str, Canary] = {}  # a deployment's id -> its canary, if it has one
        self.shadows: dict[str, Shadow] = {}  # a deployment's id -> its shadowed candidate (runtime/shadow.py)
        self.version_ids: dict[str, str] = {}  # "<deployment id>/<n>" -> that version's id (V2's /versions/<n>)
        self.loading = KeyedLocks()
        self.misses = RecentMisses()
        self.metrics = Metrics(self)
        # One core stays with this gateway process: on 2 cores, one model process that
        # takes whole batches beat two that each took half of them (bench/README.md).
        self.max_processes = max_processes or max(1, (os.cpu_count() or 1) - 1)
        self.sweep_seconds = sweep_seconds
        self.token = settings.SERVEML_RUNTIME_TOKEN.encode()

    async def pool_for(self, deployment_id: str, fresh: bool = False) -> ModelPool | None:
        """The deployment's pool, loaded on first use; None when it may not be served.
        `fresh` asks the database even about an id it just did not know (the worker's _load)."""
        canary = self.canaries.get(deployment_id)
        if canary is not None and not fresh and canary.take() and (pool := self.pools.get(canary.version_id)):
            return pool  # its pool gone (idle, unservable): the serving version answers, the sweep looks again
        pool = self.pools.get(self.routes.get(deployment_id, deployment_id))
        if pool is not None:
            return pool
        if fresh:
            self.misses.forget(deployment_id)
        elif deployment_id in self.misses:
            return None
        async with self.loading.hold(deployment_id):
            if (pool := self.pools.get(self.routes.get(deployment_id, deployment_id))) is not None:
                return pool
            if not fresh and deployment_id in self.misses:  # a request ahead of this one just asked
                return None
            return await self._load(deployment_id)

    async def version_pool(self, deployment_id: str, number: int) -> ModelPool | None:
        """Version `number` of a deployment, whether or not it serves the deployment's URL."""
        key = f"{deployment_id}/{number}"
        pool = self.pools.get(self.version_ids.get(key, ""))
        if pool is not None:
            return pool
        if key in self.misses:
            return None
        async with self.loading.hold(key):
            if (pool := self.pools.get(self.version_ids.get(key, ""))) is not None:
                return pool
            found = await sync_to_async(lookup_version)(deployment_id, number)
            if found is None:
                self.misses.add(key)
                return None
            self.version_ids[key] = found[0].deployment_id
            return await self._pool(*found)

    async def _load(self, deployment_id: str) -> ModelPool | None:
        found = await sync_to_async(lookup)(deployment_id)
        if found is None:
            self.misses.add(deployment_id)
            return None
        pool = await self._pool(*found)
        self._route(deployment_id, found[0].deployment_id)
        return pool

    async def _pool(self, spec, access) -> ModelPool:
        """The warm pool of the version `spec` names: the one running already, or a new one."""
        pool = self.pools.get(spec.deployment_id)
        if pool is None:
            pool = ModelPool(spec, access, self.max_processes)
            pool.stats = await self.metrics.track(spec)
            await pool.warm()
            if spec.deployment_id in self.pools:  # loaded through another id meanwhile: keep one
                pool.close()
            else:
                self.pools[spec.deployment_id] = pool
        return self.pools[spec.deployment_id]

    def _route(self, deployment_id: str, version_id: str) -> None:
        if version_id == deployment_id:
            self.routes.pop(deployment_id, None)
        else:
            self.routes[deployment_id] = version_id

    async def switch(self, deployment_id: str) -> ModelPool | None:
        """Send a deployment's stable URL to the version that serves it now (a promote or a
        rollback). The version's pool is warm before the route changes, so no request waits for
        a model to load; requests that already reached the old pool finish there, and its
        processes stop once nothing routes to it and it is idle (drain). Its canary, if it has one,
        follows the database the same way (started, changed, ended or promoted)."""
        found = await sync_to_async(lookup)(deployment_id)
        if found is None:
            return None
        pool = await self._pool(*found)
        pool.access = found[1]
        canary = await self._canary_pool(deployment_id)
        shadow = await self._shadow_pool(deployment_id)
        old = self.routes.get(deployment_id, deployment_id)
        self._route(deployment_id, found[0].deployment_id)  # one assignment: the next request goes there
        if old != found[0].deployment_id:
            log.info("%s now answers with %s (was %s)", deployment_id, found[0].deployment_id, old)
            asyncio.get_running_loop().create_task(self.drain(old, deployment_id))
        self._set_canary(deployment_id, canary)
        self._set_shadow(deployment_id, shadow)
        return pool

    async def _shadow_pool(self, deployment_id: str) -> str | None:
        """The id of the deployment's shadowed candidate, its pool warm; None without one or when it does not load."""
        found = await sync_to_async(lookup_shadow)(deployment_id)
        if found is None:
            return None
        try:
            pool = await self._pool(*found)
        except ModelUnavailable as exc:
            log.warning("the shadow %s of %s did not load: %s", found[0].deployment_id, deployment_id, exc.message)
            return None
        pool.access = found[1]
        return found[0].deployment_id

    def _set_shadow(self, deployment_id: str, version_id: str | None) -> None:
        old = self.shadows.get(deployment_id)
        if version_id is None:
            self.shadows.pop(deployment_id, None)
        elif old is None or old.version_id != version_id:
            self.shadows[deployment_id] = Shadow(version_id)  # a new candidate: its own counts
        if old is not None and old.version_id != version_id:
            asyncio.get_running_loop().create_task(self.drain(old.version_id, deployment_id))

    async def _canary_pool(self, deployment_id: str) -> tuple[str, int] | None:
        """The deployment's canary (its version's id, its percent) with its pool warm; None without
        one, or when it does not load: the serving version then answers every request."""
        found = await sync_to_async(lookup_canary)(deployment_id)
        if found is None:
            return None
        spec, access, percent = found
        try:
            pool = await self._pool(spec, access)
        except ModelUnavailable as exc:
            log.warning("the canary %s of %s did not load: %s", spec.deployment_id, deployment_id, exc.message)
            return None
        pool.access = access
        return spec.deployment_id, percent

    def _set_canary(self, deployment_id: str, canary: tuple[str, int] | None) -> None:
        old = self.canaries.get(deployment_id)
        if canary is None:
            self.canaries.pop(deployment_id, None)
        elif old is None or old.version_id != canary[0]:
            self.canaries[deployment_id] = Canary(*canary)
        else:
            old.percent = canary[1]
        if old is not None and old.version_id != (canary and canary[0]):
            log.info("%s: the canary %s ended", deployment_id, old.version_id)
            asyncio.get_running_loop().create_task(self.drain(old.version_id, deployment_id))

    def _shadow_changed(self, deployment_id: str, wanted: str | None) -> bool:
        shadow = self.shadows.get(deployment_id)
        if wanted is None:
            return shadow is not None
        return shadow is None or shadow.version_id != wanted or wanted not in self.pools

    def _canary_changed(self, deployment_id: str, wanted: tuple[str, int] | None) -> bool:
        canary = self.canaries.get(deployment_id)
        if wanted is None:
            return canary is not None
        return canary is None or (canary.version_id, canary.percent) != wanted or wanted[0] not in self.pools

    async def drain(self, version_id: str, deployment_id: str, grace: float = 1.0) -> None:
        """Stop a pool nothing routes to any more, once the requests it holds are answered."""
        await asyncio.sleep(grace)  # a request that took the old pool just before the switch reaches it
        while (pool := self.pools.get(version_id)) is not None:
            if self.routes.get(deployment_id, deployment_id) == version_id or version_id in self.routes.values():
                return  # it serves again (rolled back meanwhile)
            if any(canary.version_id == version_id for canary in self.canaries.values()):
                return  # a canary again
            if any(shadow.version_id == version_id for shadow in self.shadows.values()):
                return  # shadowed
            if not pool.busy:
                log.info("stopping the model processes of %s: nothing routes to it", version_id)
                self.stop_pool(version_id)
                return
            await asyncio.sleep(0.05)

    def unload(self, deployment_id: str) -> bool:
        """Stop serving a deployment (stopped, or no longer servable): its route and its pool."""
        self.routes.pop(deployment_id, None)
        return self.stop_pool(deployment_id)

    def stop_pool(self, version_id: str) -> bool:
        """Stop one version's model processes (drained, or idle), leaving every route as it is:
        the pool of version 1 is kept under the deployment's own id, which may route to version 2."""
        pool = self.pools.pop(version_id, None)
        if pool:
            pool.close()
        return pool is not None

    async def reroute(self) -> None:
        """Follow promotes the runtime was not told about, and forget routes of stopped deployments."""
        ids = [*self.routes, *self.pools]
        now = await sync_to_async(serving)(ids)
        wanted = await sync_to_async(canaries)(list(now)) if now else {}
        shadowed = await sync_to_async(shadows)(list(now)) if now else {}
        for deployment_id in ids:
            if deployment_id not in now:
                self.routes.pop(deployment_id, None)
                self.canaries.pop(deployment_id, None)
                self.shadows.pop(deployment_id, None)
            elif (
                self.routes.get(deployment_id, deployment_id) != now[deployment_id]
                or self._canary_changed(deployment_id, wanted.get(deployment_id))
                or self._shadow_changed(deployment_id, shadowed.get(deployment_id))
            ):
                try:
                    await self.switch(deployment_id)
                except ModelUnavailable as exc:  # the version did not load: the old one keeps serving
                    log.warning("could not switch %s to %s: %s", deployment_id, now[deployment_id], exc.message)

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
            self.stop_pool(deployment_id)
        return idle

    async def keep_to_budget(self) -> list[str]:
        """Stop the least recently used deployments' model processes while all model memory
        is over SERVEML_RUNTIME_MEMORY_BYTES; they load again on their next request."""
        budget = settings.SERVEML_RUNTIME_MEMORY_BYTES
        if not budget or not self.pools:
            return []
        # Reading every process's smaps_rollup takes a while with hundreds of them: not on the loop.
        chosen = await asyncio.to_thread(memory.over_budget, dict(self.pools), templates.shared.pids(), budget)
        for version_id in chosen:
            pool = self.pools.get(version_id)
            if pool is not None and not pool.busy:
                log.info("stopping the model processes of %s: model memory is over its budget", version_id)
                self.stop_pool(version_id)
        return chosen

    async def sweep(self) -> None:
        """Catch changes the runtime was not told about (it was down, or a call failed)."""
        rounds = 0
        while True:
            await asyncio.sleep(self.sweep_seconds)
            rounds += 1
            self.scale_to_zero()
            templates.shared.sweep()
            if rounds % BUDGET_EVERY == 0:
                try:
                    await self.keep_to_budget()
                except Exception:
                    log.exception("the memory budget could not be checked")
            self.metrics.sample()
            if self.pools:
                try:
                    await self.reroute()
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
        if parts[0] in ("metrics", "_figures"):
            return await self.metrics.serve(scope, send)
        if parts[0] == "v2":  # the Open Inference Protocol, translated onto the same pools
            return await v2.serve(self, scope, receive, send)
        if len(parts) == 3 and parts[0] == "predict" and parts[2] == "openapi.json" and method == "GET":
            return await self.document(canonical_uuid(parts[:2]), dict(scope["headers"]), send)
        # Loaded ids are already canonical: the common case costs one dict lookup.
        deployment_id = parts[1] if len(parts) == 2 and parts[1] in self.pools else canonical_uuid(parts)
        if deployment_id is None:
            return await respond(send, 404, error("no deployment answers at this URL"))
        if parts[0] == "predict":
            if method != "POST":
                return await respond(send, 405, error("send predictions with POST and a JSON body"))
            return await self.predict(deployment_id, dict(scope["headers"]), receive, send)
        if parts[0] in ("_load", "_unload", "_refresh", "_route") and method == "POST":
            return await self.control(parts[0], deployment_id, scope, send)
        if parts[0] == "_shadow" and method == "GET":
            return await self.shadow_report(deployment_id, scope, send)
        return await respond(send, 404, error("no deployment answers at this URL"))

    async def predict(self, deployment_id: str, headers: dict, receive, send):
        started = time.perf_counter()
        body = await read_body(receive)
        if body is None:
            return await respond(send, 413, error(f"request body is larger than {MAX_BODY // 1024**2} MB"))
        try:
            pool = await self.pool_with_access(deployment_id, headers)
        except ModelUnavailable as exc:
            self.metrics.refused(deployment_id, exc.status, started)
            return await respond(send, exc.status, error(exc.message))
        stats = pool.stats  # counted inline, not through metrics.counted: this is the benchmarked path
        stats.in_flight += 1
        try:
            problem, rows, frame = check_prediction(body, pool.arrays)
            if problem:
                status, answer = 400, error(problem)
            else:
                status, answer = await pool.predict(body, frame)
        except ModelUnavailable as exc:
            status, answer = exc.status, error(exc.message)
        finally:
            stats.in_flight -= 1
        stats.record(status, started)
        if status < 300:
            stats.rows += rows  # only answered requests' rows are predicted rows
        await respond(send, status, answer)
        if status == 200 and (shadow := self.shadows.get(deployment_id)) is not None:
            if pool.spec.deployment_id != shadow.version_id:  # a canary's answer is not compared with itself
                shadow.offer(self.pools.get(shadow.version_id), body, answer)  # after the answer went out

    async def document(self, deployment_id: str | None, headers: dict, send):
        """`<endpoint_url>/openapi.json`: the prediction URL's OpenAPI document, for whoever may call it."""
        found = await sync_to_async(openapi_document)(deployment_id) if deployment_id else None
        if found is None:
            return await respond(
                send, 404, error("no deployment answers at this URL: it does not exist or was stopped")
            )
        document, access = found
        if not access.allows(headers, self.token):
            return await respond(send, 401, error("this endpoint is private: send one of its API keys"))
        await respond(send, 200, orjson.dumps(document))

    async def pool_with_access(self, deployment_id: str, headers: dict, version: int | None = None) -> ModelPool:
        """The deployment's pool (or its version `version`'s), if it may be served and these headers may call it."""
        pool = await (self.pool_for(deployment_id) if version is None else self.version_pool(deployment_id, version))
        if pool is None:
            raise ModelUnavailable(404, "no deployment answers at this URL: it does not exist or was stopped")
        if not pool.access.allows(headers, self.token):
            raise ModelUnavailable(
                401,
                "this endpoint is private: send one of its API keys as `Authorization: Bearer <key>` "
                "or `X-API-Key: <key>` (the deployment's owner creates keys on its page)",
            )
        return pool

    async def shadow_report(self, deployment_id: str, scope, send):
        """What the shadow comparison of a deployment found so far (the web page's; runtime token)."""
        if not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), b"Bearer " + self.token):
            return await respond(send, 403, error("bad runtime token"))
        shadow = self.shadows.get(deployment_id)
        if shadow is None:
            return await respond(send, 404, error("no version of this deployment is shadowed here"))
        await respond(send, 200, orjson.dumps(shadow.report()))

    async def control(self, action: str, deployment_id: str, scope, send):
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, b"Bearer " + self.token):
            return await respond(send, 403, error("bad runtime token"))
        if action == "_unload":  # the deployment was stopped
            self.metrics.forget(deployment_id)
            return await respond(send, 200, orjson.dumps({"unloaded": self.unload(deployment_id)}))
        if action == "_refresh":
            await self.refresh([deployment_id, self.routes.get(deployment_id, deployment_id)])  # and its version's
            return await respond(send, 200, orjson.dumps({"refreshed": deployment_id in self.pools}))
        if action == "_route":
            try:
                pool = await self.switch(deployment_id)
            except ModelUnavailable as exc:
                return await respond(send, exc.status, error(exc.message))
            return await respond(
                send, 200 if pool else 404, orjson.dumps({"serving": pool and pool.spec.deployment_id})
            )
        try:
            pool = await self.pool_for(deployment_id, fresh=True)  # it may have become servable just now
        except ModelUnavailable as exc:
            return await respond(send, exc.status, error(exc.message))
        if pool is None:
            return await respond(send, 404, error("the deployment is not ready to be served"))
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
                templates.shared.stop_all()
                await send({"type": "lifespan.shutdown.complete"})
                return
