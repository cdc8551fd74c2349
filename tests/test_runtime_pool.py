"""The runtime's model pool against real sandboxed model processes (model_server.py), with a
stand-in handler whose answers show how requests were batched and which can hang or crash."""

import asyncio
from pathlib import Path

import pytest
from django.conf import settings

from deployments.runtime.gateway import ModelPool, ModelUnavailable, Spec, Access

HANDLER = '''
import os, time

def model():
    if os.path.exists("model.broken"):
        raise RuntimeError("cannot read this model")
    if os.path.exists("model.slow"):
        time.sleep(1)

def handle_many(bodies):
    answers = []
    for body in bodies:
        if body == b"hang":
            time.sleep(60)
        if body == b"crash":
            os._exit(7)
        answers.append((200, b"%d:%s" % (len(bodies), body)))
    return answers
'''


def pool_for(tmp_path: Path, max_size: int = 1, model_file: str = "model.pkl") -> ModelPool:
    """`model.broken` fails to load; `model.slow` takes a second to."""
    build = tmp_path / "build"
    build.mkdir()
    (build / "handler.py").write_text(HANDLER)
    model = build / model_file
    model.write_bytes(b"")
    spec = Spec("0f0e0d0c-0000-4000-8000-000000000000", Path(settings.SERVEML_ENV_PYTHON), build, model)
    return ModelPool(spec, Access(), max_size=max_size)


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def test_every_request_gets_its_own_answer_and_waiting_ones_share_a_frame(tmp_path):
    async def scenario():
        pool = pool_for(tmp_path)
        try:
            await pool.warm()
            bodies = [b"row-%d" % n for n in range(40)]
            return bodies, await asyncio.gather(*(pool.predict(body) for body in bodies))
        finally:
            pool.close()

    bodies, answers = run(scenario())
    assert [answer.split(b":")[1] for _, answer in answers] == bodies
    assert {status for status, _ in answers} == {200}
    batch_sizes = [int(answer.split(b":")[0]) for _, answer in answers]
    assert max(batch_sizes) > 1  # they arrived together, so the process took them together
    assert max(batch_sizes) <= ModelPool.MAX_BATCH


@pytest.mark.parametrize("body, status, says", [
    (b"hang", 504, "longer than 1 s"),  # the timeout kills it
    (b"crash", 502, "exit code 7"),  # it exits on its own
])
def test_a_process_that_hangs_or_crashes_fails_its_requests_and_is_replaced(tmp_path, settings, body, status, says):
    settings.SERVEML_PREDICT_TIMEOUT_S = 1

    async def scenario():
        pool = pool_for(tmp_path)
        try:
            with pytest.raises(ModelUnavailable) as failed:
                await pool.predict(body)
            return failed.value, await pool.predict(b"after")
        finally:
            pool.close()

    error, after = run(scenario())
    assert error.status == status and says in error.message and "restarted on the next request" in error.message
    assert after == (200, b"1:after")


def test_a_request_sent_to_a_process_that_died_while_idle_is_answered_by_a_fresh_one(tmp_path):
    import os
    import signal

    async def scenario():
        pool = pool_for(tmp_path)
        try:
            await pool.warm()
            (process,) = pool.processes
            os.kill(process.transport.get_pid(), signal.SIGKILL)
            # Sent at once: the runtime has not yet heard that the process is gone.
            return await pool.predict(b"after")
        finally:
            pool.close()

    assert run(scenario()) == (200, b"1:after")


def test_a_model_that_cannot_load_fails_every_waiting_request_instead_of_hanging(tmp_path):
    async def scenario():
        pool = pool_for(tmp_path, model_file="model.broken")
        return await asyncio.gather(pool.predict(b"first"), pool.predict(b"second"), return_exceptions=True)

    first, second = run(scenario(), timeout=30)
    for error in (first, second):
        assert isinstance(error, ModelUnavailable) and error.status == 503
        assert "RuntimeError: cannot read this model" in error.message


def test_stopping_a_deployment_answers_its_requests_in_flight_with_404(tmp_path):
    async def scenario():
        pool = pool_for(tmp_path)
        await pool.warm()
        assert not pool.busy
        in_flight = asyncio.ensure_future(pool.predict(b"hang"))
        await asyncio.sleep(0.3)
        assert pool.busy and not pool.pending  # answering: scale-to-zero must leave it alone
        pool.close()
        with pytest.raises(ModelUnavailable) as stopped:
            await in_flight
        return stopped.value

    assert run(scenario()).status == 404


@pytest.mark.parametrize("crash_first", [False, True], ids=["first-start", "restart"])
def test_stopping_a_deployment_while_its_process_starts_answers_404_not_a_load_error(tmp_path, crash_first):
    async def scenario():
        pool = pool_for(tmp_path, model_file="model.slow")
        if crash_first:
            with pytest.raises(ModelUnavailable):
                await pool.predict(b"crash")
        waiting = asyncio.ensure_future(pool.predict(b"after"))
        await asyncio.sleep(0.3)  # its model process is loading the model
        pool.close()
        with pytest.raises(ModelUnavailable) as stopped:
            await waiting
        return stopped.value

    error = run(scenario())
    assert error.status == 404 and "stopped" in error.message


def test_answers_split_across_pipe_reads_are_put_back_together():
    from deployments.runtime.gateway import FRAME, _Channel

    class Process:
        def __init__(self):
            self.answers = []
            self.channel = None

        def answered(self, status, body):
            self.answers.append((status, body))

    bodies = [(200, b'{"prediction":0}'), (400, b'{"error":"expected 4 features per row, got 2"}'), (200, b"x" * 70000)]
    stream = b"".join(FRAME.pack(len(body), status) + body for status, body in bodies)
    for chunk_size in (1, 5, 6, 7, 4096, len(stream)):
        process = Process()
        process.channel = channel = _Channel(process)
        for start in range(0, len(stream), chunk_size):
            channel.pipe_data_received(1, stream[start:start + chunk_size])
        assert process.answers == bodies, chunk_size
        assert channel.buffer == b""
