"""Warm templates: model processes forked from an interpreter that imported the heavy modules once.

A model process that starts its own interpreter spends most of a second and
~75 MB of private memory importing numpy, scipy and scikit-learn before it
reads a few KB of model. A template (buildkit/serveml_template.py) does that
once per environment and owner, in its own sandbox; each model process is a
fork of it that shares those pages, isolated before it loads its model (the
template's docstring lists the steps). A deployment's first request then
waits for a fork and its model, not for an interpreter.

One template per (environment, owner): a template runs the environment's
packages, so it may only hold processes of deployments that chose those
packages, and of one owner, so that nothing left running in it can carry one
user's model into another user's answers.

A template is started by the first model process that needs it and stopped once
it has had no model process for SERVEML_TEMPLATE_IDLE_SECONDS. Stopping it (or
its crash) ends every process forked from it: they share its sandbox.
"""

import asyncio
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from deployments import buildkit, sandbox
from deployments.runtime import protocol

log = logging.getLogger("serveml.runtime")
TEMPLATE_FILES = {
    "serveml_template.py": buildkit.TEMPLATE,
    "model_server.py": buildkit.MODEL_SERVER,
    "protocol.py": Path(protocol.__file__),
    "serveml_keyring.py": buildkit.KEYRING,  # imported by serveml_userns.py and the template
}


class TemplateUnavailable(Exception):
    """The template could not start or fork; the message says why."""


def enabled() -> bool:
    return settings.SERVEML_TEMPLATES and not sandbox.is_disabled()


@dataclass
class Forked:
    """A model process forked from a template: its host pid and a pidfd to signal it by."""

    pid: int
    pidfd: int

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def host_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, as this process's PID namespace numbers it."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise TemplateUnavailable("the kernel did not say which process the template forked")


def log_name(environment: Path, owner) -> str:
    """Each template writes its own log: a hostile package in one cannot truncate, forge or fill another's."""
    return f"template-{environment.name}-{owner}.log"


class Template:
    def __init__(self, environment: Path, owner):
        self.environment = environment
        self.owner = owner
        self.control: socket.socket | None = None
        self.transport: asyncio.SubprocessTransport | None = None
        self.lock = asyncio.Lock()  # one fork at a time: each request waits for its own answer
        self.children = 0  # model processes alive, forked from it
        self.idle_since = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.imported: list[str] = []
        self.stopped = False

    @property
    def alive(self) -> bool:
        return not self.stopped and self.transport is not None and self.transport.get_returncode() is None

    @property
    def log_name(self) -> str:
        return log_name(self.environment, self.owner)

    @property
    def pid(self) -> int | None:
        return self.transport.get_pid() if self.transport else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.control = ours
        theirs = theirs.detach()  # from here the Launch owns it, and closes it once the child has it
        limits = sandbox.Limits(memory_bytes=settings.SERVEML_MODEL_MEMORY_BYTES, cpu_seconds=None)
        try:
            launched = sandbox.launch_template(
                environment=self.environment, limits=limits, files=TEMPLATE_FILES, control_fd=theirs
            )
        except (sandbox.SandboxUnavailable, OSError) as exc:
            os.close(theirs)
            self.stop()
            raise TemplateUnavailable(f"the template could not start: {exc}") from None
        logs = settings.DATA_DIR / "logs"
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with open(logs / self.log_name, "ab") as stderr:
                self.transport, _ = await self.loop.subprocess_exec(
                    asyncio.SubprocessProtocol,
                    *launched.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                    **launched.popen_kwargs(),
                )
        except OSError as exc:
            self.stop()
            raise TemplateUnavailable(f"the template could not start: {exc}") from None
        finally:
            launched.close()
        try:
            async with asyncio.timeout(settings.SERVEML_SANDBOX_WALL_SECONDS):
                message, fds = await self._receive()
        except TimeoutError:
            self.stop()
            raise TemplateUnavailable(
                f"the template did not import its modules in {settings.SERVEML_SANDBOX_WALL_SECONDS} s"
            ) from None
        for fd in fds:
            os.close(fd)
        if "ready" not in message:
            self.stop()
            raise TemplateUnavailable(message.get("error", "the template failed to start"))
        self.imported = message["ready"]
        log.info(
            "template %s for %s started in %s s (%s)",
            self.pid,
            self.environment.name,
            message.get("seconds"),
            ", ".join(self.imported),
        )

    async def fork(
        self, *, uid: int, label: str, limits: sandbox.Limits, requests: int, answers: int, log_fd: int, files: dict
    ):
        """Fork a model process for deployment uid `uid` reading `requests` and writing `answers` (pipes),
        its stderr to `log_fd`, with `files` (name -> open descriptor) as its /work."""
        inside = uid - settings.SERVEML_SANDBOX_UID_BASE
        if not 0 < inside < settings.SERVEML_SANDBOX_UID_COUNT:
            raise TemplateUnavailable(
                f"uid {uid} is outside the sandbox's uid range (SERVEML_SANDBOX_UID_BASE + 1 to "
                f"+ SERVEML_SANDBOX_UID_COUNT - 1): raise SERVEML_SANDBOX_UID_COUNT"
            )
        request = {
            "uid": inside,
            "label": label,
            "files": list(files),
            "limits": {
                "memory_bytes": limits.memory_bytes,
                "cpu_seconds": limits.cpu_seconds,
                "processes": limits.processes,
                "file_bytes": limits.file_bytes,
                "open_files": limits.open_files,
                "tmp_bytes": limits.tmp_bytes,
            },
        }
        async with self.lock:
            if not self.alive:
                raise TemplateUnavailable("the template stopped")
            try:
                handed = [requests, answers, log_fd, *files.values()]
                socket.send_fds(self.control, [json.dumps(request).encode()], handed)
                async with asyncio.timeout(settings.SERVEML_SANDBOX_WALL_SECONDS):
                    message, fds = await self._receive()
            except (OSError, TimeoutError) as exc:
                self.stop()
                raise TemplateUnavailable(f"the template did not fork: {exc or 'timed out'}") from None
        if "pid" not in message or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise TemplateUnavailable(message.get("error", "the template did not fork"))
        try:  # the template runs the environment's packages: what it sent may be anything
            pid = host_pid(fds[0])
        except (OSError, TemplateUnavailable):
            os.close(fds[0])
            raise TemplateUnavailable("the template answered a fork with something that is not a process") from None
        forked = Forked(pid, fds[0])
        self.children += 1
        return forked

    def released(self) -> None:
        """One of its model processes is gone."""
        self.children = max(0, self.children - 1)
        if not self.children:
            self.idle_since = time.monotonic()

    async def _receive(self) -> tuple[dict, list[int]]:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, 65536, 4)
            except BlockingIOError:
                await self._readable()
                continue
            if not data:
                self.stop()
                raise TemplateUnavailable(f"the template exited (see logs/{self.log_name})")
            try:
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError(message)
            except ValueError:  # it is not the template's code speaking: nothing it sent is kept
                for fd in fds:
                    os.close(fd)
                self.stop()
                raise TemplateUnavailable("the template answered with something that is not a message") from None
            return message, fds

    async def _readable(self) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(self.control.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_reader(self.control.fileno())

    def stop(self) -> None:
        """Stop it and, with it, every model process it forked."""
        self.stopped = True
        if self.transport is not None:
            if self.transport.get_returncode() is None:
                sandbox.kill_group(self.transport.get_pid())
            self.transport.close()
        if self.control is not None:
            self.control.close()
            self.control = None


class Templates:
    """The runtime's templates, by (environment, owner)."""

    def __init__(self):
        self.templates: dict[tuple[Path, object], Template] = {}
        self.starting: dict[tuple[Path, object], asyncio.Lock] = {}

    async def get(self, environment: Path, owner) -> Template:
        key = (environment, owner)
        lock = self.starting.setdefault(key, asyncio.Lock())
        async with lock:
            template = self.templates.get(key)
            if template is not None and template.alive and template.loop is asyncio.get_running_loop():
                return template
            if template is not None:
                template.stop()
            template = Template(environment, owner)
            self.templates[key] = template
            try:
                await template.start()
            except BaseException:
                self.templates.pop(key, None)
                raise
            return template

    def sweep(self, now: float | None = None) -> None:
        """Stop templates that have had no model process for SERVEML_TEMPLATE_IDLE_SECONDS."""
        now = time.monotonic() if now is None else now
        for key, template in list(self.templates.items()):
            if template.transport is None and not template.stopped:
                continue  # still starting: get() is waiting for it
            idle = not template.children and now - template.idle_since > settings.SERVEML_TEMPLATE_IDLE_SECONDS
            if idle or not template.alive:
                template.stop()
                del self.templates[key]
        # A lock nobody holds is only worth keeping beside its template; without this, every
        # (environment, owner) ever served would keep one. Nothing waits on an unheld lock, and
        # get() acquires the lock it makes without yielding first.
        for key in [key for key, lock in self.starting.items() if key not in self.templates and not lock.locked()]:
            del self.starting[key]

    def pids(self) -> list[int]:
        return [template.pid for template in self.templates.values() if template.alive]

    def stop_all(self) -> None:
        for template in self.templates.values():
            template.stop()
        self.templates.clear()
        self.starting.clear()


# One set per runtime process, as a connection pool would be.
shared = Templates()
