"""The runtime's model pool against real sandboxed model processes (model_server.py), with a
stand-in handler whose answers show how requests were batched and which can hang or crash;
then the frame format both sides share, the runtime's checks of prediction bodies, and what
unknown deployment ids may cost it."""

import asyncio
from pathlib import Path

import pytest
from django.conf import settings

from deployments.runtime.access import Access
from deployments.runtime.pool import ModelPool
from deployments.runtime.process import ModelUnavailable
from deployments.runtime.registry import Spec
from tests.conftest import stand_in_build

HANDLER = """
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
        if body == b"last-words":  # answers, then exits before the runtime has read the answer
            import sys
            import protocol
            frame = sys._getframe()
            while frame.f_code.co_name != "main":  # model_server.main, which holds the answer pipe
                frame = frame.f_back
            frame.f_locals["channel"].write(protocol.encode_answers([(200, b"last words")]))
            os._exit(0)
        if body == b"huge":
            answers.append((200, b"x" * (2 * 1024 * 1024)))
            continue
        answers.append((200, b"%d:%s" % (len(bodies), body)))
    return answers
"""


@pytest.fixture(scope="module")
def environment():
    from deployments.environments import ensure_environment
    from deployments.requirements import parse_requirements
    from tests.conftest import SKLEARN_PIN

    return ensure_environment(parse_requirements(SKLEARN_PIN)).path


@pytest.fixture
def pool_for(environment):
    def make(tmp_path: Path, max_size: int = 1, model_file: str = "model.pkl") -> ModelPool:
        """A build context with the stand-in handler: `model.broken` fails to load; `model.slow` takes a second to."""
        build = tmp_path / "build"
        model = stand_in_build(build, HANDLER, model_file)
        spec = Spec("0f0e0d0c-0000-4000-8000-000000000000", environment, build, model, 2_000_999)
        return ModelPool(spec, Access(), max_size=max_size)

    return make


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def test_every_request_gets_its_own_answer_and_waiting_ones_share_a_frame(pool_for, tmp_path):
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


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b"hang", 504, "longer than 1 s"),  # the timeout kills it
        (b"crash", 502, "crashed while answering"),  # it exits on its own
    ],
)
def test_a_process_that_hangs_or_crashes_fails_its_requests_and_is_replaced(
    pool_for, tmp_path, settings, body, status, says
):
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


def test_an_answer_written_just_before_the_process_exits_still_reaches_its_request(pool_for, tmp_path):
    # The runtime handles a forked process's answers a turn of the event loop after it reads them
    # (process.py: larger batches); the pipe's end, read at the same time, must not overtake them
    # and fail a request whose answer is already in.
    async def scenario():
        pool = pool_for(tmp_path)
        try:
            return [await pool.predict(b"last-words") for _ in range(5)]
        finally:
            pool.close()

    assert run(scenario()) == [(200, b"last words")] * 5


def test_a_request_sent_to_a_process_that_died_while_idle_is_answered_by_a_fresh_one(pool_for, tmp_path):
    import os
    import signal

    async def scenario():
        pool = pool_for(tmp_path)
        try:
            await pool.warm()
            (process,) = pool.processes
            os.kill(process.pid, signal.SIGKILL)
            # Sent at once: the runtime has not yet heard that the process is gone.
            return await pool.predict(b"after")
        finally:
            pool.close()

    assert run(scenario()) == (200, b"1:after")


def test_a_model_that_cannot_load_fails_every_waiting_request_instead_of_hanging(pool_for, tmp_path):
    async def scenario():
        pool = pool_for(tmp_path, model_file="model.broken")
        return await asyncio.gather(pool.predict(b"first"), pool.predict(b"second"), return_exceptions=True)

    first, second = run(scenario(), timeout=30)
    for error in (first, second):
        assert isinstance(error, ModelUnavailable) and error.status == 503
        assert "RuntimeError: cannot read this model" in error.message


def test_stopping_a_deployment_answers_its_requests_in_flight_with_404(pool_for, tmp_path):
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
def test_stopping_a_deployment_while_its_process_starts_answers_404_not_a_load_error(pool_for, tmp_path, crash_first):
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
    from deployments.runtime.process import _Channel
    from deployments.runtime.protocol import ANSWER_HEADER as FRAME

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
            channel.received(stream[start : start + chunk_size])
        assert process.answers == bodies, chunk_size
        assert channel.buffer == b""


def test_a_batch_and_its_answers_survive_the_trip_through_the_shared_frame_format():
    import io

    from deployments.runtime import protocol

    bodies = [b'{"data": [1, 2]}', b"", b"x" * 70000]
    stdin = io.BytesIO(protocol.encode_requests(bodies) + protocol.encode_requests([b"next"]))
    assert protocol.read_requests(stdin.read) == bodies
    assert protocol.read_requests(stdin.read) == [b"next"]
    assert protocol.read_requests(stdin.read) is None  # the runtime closed the pipe

    answers = [(200, b'{"prediction":0}'), (400, b'{"error":"bad"}')]
    stream = protocol.encode_answers(answers)
    first = protocol.decode_answer(stream)
    second = protocol.decode_answer(stream, first[2])
    assert [first[:2], second[:2]] == answers and second[2] == len(stream)
    assert protocol.decode_answer(stream[:-1], first[2]) is None  # not all of it is in yet


def test_the_protocol_module_imports_nothing_but_the_standard_library():
    import ast
    import sys

    from deployments.runtime import protocol

    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= set(sys.stdlib_module_names)


def test_an_answer_announced_larger_than_the_cap_is_refused_before_it_is_buffered():
    from deployments.runtime import protocol
    from deployments.runtime.process import _Channel

    class Process:
        def __init__(self):
            self.answers, self.too_large, self.channel = [], [], None

        def answered(self, status, body):
            self.answers.append((status, body))

        def answer_too_large(self, size):
            self.too_large.append(size)

    process = Process()
    process.channel = channel = _Channel(process)
    announced = protocol.MAX_ANSWER_BYTES + 1
    channel.received(protocol.encode_answer(200, b"fine") + protocol.ANSWER_HEADER.pack(announced, 200))
    channel.received(b"x" * 65536)  # the rest of it, which nobody keeps
    assert process.answers == [(200, b"fine")]
    assert process.too_large == [announced]
    assert channel.buffer == b""


def test_a_model_answering_more_than_the_cap_answers_502_and_its_process_is_replaced(pool_for, tmp_path, monkeypatch):
    from deployments.runtime import protocol

    monkeypatch.setattr(protocol, "MAX_ANSWER_BYTES", 1024 * 1024)  # the stand-in answers 2 MB

    async def scenario():
        pool = pool_for(tmp_path)
        try:
            await pool.warm()
            (process,) = pool.processes
            first_pid = process.pid
            with pytest.raises(ModelUnavailable) as refused:
                await pool.predict(b"huge")
            after = await pool.predict(b"after")
            return refused.value, after, first_pid != process.pid
        finally:
            pool.close()

    error, after, replaced = run(scenario())
    assert error.status == 502 and "answer was larger than 1 MB" in error.message
    assert after == (200, b"1:after") and replaced


async def call(runtime, path: str, body: bytes) -> tuple[int, dict | bytes]:
    """One POST through the runtime's ASGI interface."""
    import orjson

    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await runtime({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
    answer = sent[1]["body"]
    return sent[0]["status"], orjson.loads(answer) if answer.startswith(b"{") else answer


def test_a_body_of_200_kb_of_nested_brackets_answers_400_and_the_model_process_keeps_running(pool_for, tmp_path):
    from deployments.runtime.app import Runtime

    async def scenario():
        pool = pool_for(tmp_path)
        runtime = Runtime(max_processes=1)
        runtime.pools[pool.spec.deployment_id] = pool
        url = f"/predict/{pool.spec.deployment_id}"
        try:
            await pool.warm()
            pid = pool.processes[0].pid
            refused = await call(runtime, url, b"[" * 200_000)
            after = await call(runtime, url, b'{"data": [1]}')
            return refused, after, pool.processes[0].pid == pid
        finally:
            pool.close()

    (status, answer), after, same_process = run(scenario())
    assert status == 400 and answer["error"].startswith("request body is not valid JSON")
    assert after == (200, b'1:{"data": [1]}')
    assert same_process


@pytest.mark.parametrize(
    "body, problem",
    [
        (b'{"data": [5.1, 3.5, 1.4, 0.2]}', None),
        (b"[" * 32 + b"]" * 32, None),
        (b"[" * 33 + b"]" * 33, "request body is nested deeper than 32 levels"),
        (b'{"a": ' * 33 + b"1" + b"}" * 33, "request body is nested deeper than 32 levels"),
        (b'["' + b"[" * 100 + b'"]', None),  # brackets inside a string nest nothing
        (b'{"data": [1, 2', "request body is not valid JSON"),
        (b"", "request body is not valid JSON"),
    ],
)
def test_the_runtime_lets_through_only_json_nested_at_most_32_levels(body, problem):
    from deployments.runtime.asgi import check_body

    found, _ = check_body(body)
    assert found == problem if problem is None else found.startswith(problem)


def test_checking_the_depth_of_a_hundred_rows_of_four_numbers_takes_microseconds():
    import timeit

    import orjson

    from deployments.runtime.asgi import MAX_DEPTH, nested_deeper_than

    rows = orjson.loads(orjson.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]] * 100}))
    best = min(timeit.repeat(lambda: nested_deeper_than(rows, MAX_DEPTH), number=200, repeat=5)) / 200
    assert best < 250e-6  # tens of microseconds on a slow shared core; a generous ceiling


def test_ten_thousand_unknown_ids_leave_the_runtime_bounded_and_a_repeated_one_is_looked_up_once(monkeypatch):
    import uuid

    from deployments.runtime import app

    looked_up = []

    def lookup(deployment_id):
        looked_up.append(deployment_id)
        return None

    monkeypatch.setattr(app, "lookup", lookup)
    runtime = app.Runtime(max_processes=1)
    repeated = str(uuid.uuid4())

    async def scenario():
        strangers = [runtime.pool_for(str(uuid.uuid4())) for _ in range(10_000)]
        assert set(await asyncio.gather(*strangers)) == {None}
        assert set(await asyncio.gather(*(runtime.pool_for(repeated) for _ in range(1_000)))) == {None}

    run(scenario())
    assert len(runtime.loading) == 0  # no lock outlives the lookups it guarded
    assert len(runtime.misses) <= runtime.misses.size
    assert runtime.pools == {}
    assert looked_up.count(repeated) == 1


def test_an_unknown_id_is_looked_up_again_after_two_seconds_or_at_once_when_the_worker_loads_it(monkeypatch):
    from deployments.runtime import app

    now = [0.0]
    looked_up = []
    monkeypatch.setattr(app, "lookup", lambda deployment_id: looked_up.append(deployment_id))
    runtime = app.Runtime(max_processes=1)
    runtime.misses.clock = lambda: now[0]
    deployment_id = "0f0e0d0c-0000-4000-8000-000000000001"

    async def scenario():
        await runtime.pool_for(deployment_id)
        await runtime.pool_for(deployment_id)  # remembered: no query
        now[0] = 2.5
        await runtime.pool_for(deployment_id)  # forgotten: asked again
        await runtime.pool_for(deployment_id, fresh=True)  # the worker's _load always asks

    run(scenario())
    assert len(looked_up) == 3


def test_the_memory_of_unknown_ids_keeps_only_the_newest():
    from deployments.runtime.registry import RecentMisses

    misses = RecentMisses(seconds=2, size=3)
    for deployment_id in "abcd":
        misses.add(deployment_id)
    assert len(misses) == 3 and "a" not in misses and "d" in misses


def test_a_first_frame_larger_than_the_cap_fails_the_load_with_503(pool_for, tmp_path):
    from deployments.runtime.process import ModelProcess

    async def scenario():
        process = ModelProcess(pool_for(tmp_path).spec)
        process.loaded = asyncio.get_running_loop().create_future()
        process.answer_too_large(2**31)
        return process.loaded.exception()

    error = run(scenario())
    assert error.status == 503 and "more than 64 MB while it loaded the model" in error.message
