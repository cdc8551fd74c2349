"""The stages, called directly on real files: real uv, real sandbox, real templates."""

import importlib.util
import json
import pickle

import pytest
import sklearn
from django.core.files.storage import default_storage
from django.test import override_settings

from deployments import buildkit, services
from deployments.allowlist import corpus
from deployments.models import Deployment
from deployments.pipeline import runner, stages
from deployments.pipeline.errors import StageError
from tests import payloads
from tests.conftest import SKLEARN_PIN, dump

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
EXEC = ("builtins", "exec")


def test_a_claim_is_atomic_so_a_redelivered_task_does_nothing(user, make_deployment, monkeypatch):
    deployment = make_deployment(user)
    assert services.deployment_claim(deployment_id=deployment.pk, token="a").status == Deployment.Status.DEPLOYING
    assert services.deployment_claim(deployment_id=deployment.pk, token="b") is None
    ran = []
    monkeypatch.setitem(runner.PIPELINES, "local", [("inspect", lambda d: ran.append(d) or "ran")])
    runner.run(deployment.pk)
    assert ran == []


def test_the_runner_records_one_event_per_stage_with_its_duration(user, make_deployment, monkeypatch):
    deployment = make_deployment(user)
    monkeypatch.setitem(runner.PIPELINES, "local", [("inspect", lambda d: "looked"), ("validate", lambda d: "tested")])
    runner.run(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.READY
    timed = [(e.stage, e.message) for e in deployment.events.all() if e.duration_ms is not None]
    assert timed == [("inspect", "looked"), ("validate", "tested")]


def test_a_stage_error_fails_the_deployment_with_the_users_message(user, make_deployment, monkeypatch):
    deployment = make_deployment(user)

    def broken(d):
        raise StageError("requirements pin scikit-learn 1.3.0 but the model was saved with 1.5.2")

    monkeypatch.setitem(runner.PIPELINES, "local", [("inspect", broken), ("validate", lambda d: pytest.fail())])
    runner.run(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED and deployment.stage == "inspect"
    assert deployment.error.startswith("requirements pin scikit-learn 1.3.0")


def test_a_crashing_stage_fails_with_an_internal_error_message_not_a_traceback(user, make_deployment, monkeypatch):
    deployment = make_deployment(user)
    monkeypatch.setitem(runner.PIPELINES, "local", [("inspect", lambda d: 1 / 0)])
    runner.run(deployment.pk)
    deployment.refresh_from_db()
    assert "internal error in the inspect stage (ZeroDivisionError)" in deployment.error


# ------------------------------------------------------------------ inspect


def test_inspect_accepts_a_real_model_and_records_the_version_it_was_saved_with(user, make_deployment):
    deployment = make_deployment(user)
    summary = stages.inspect(deployment)
    assert "all on the allowlist" in summary
    assert deployment.pickled_sklearn_version == sklearn.__version__


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "builtins.eval", "pip.main", "pkgutil.resolve_name"])
def test_inspect_refuses_a_pickle_that_imports_a_dangerous_name(user, make_deployment, tmp_path, name):
    deployment = make_deployment(user, model_bytes=payloads.payloads(tmp_path / "canary")[name])
    with pytest.raises(StageError) as refused:
        stages.inspect(deployment)
    assert name in str(refused.value)
    assert "ask an operator" in str(refused.value)
    assert not (tmp_path / "canary").exists()


@override_settings(SERVEML_EXTRA_ALLOWED_GLOBALS=["subprocess:Popen"])
def test_an_operator_can_extend_the_allowlist(user, make_deployment, tmp_path):
    deployment = make_deployment(user, model_bytes=payloads.call("subprocess", "Popen", "true"))
    assert "all on the allowlist" in stages.inspect(deployment)


def test_inspect_catches_a_scikit_learn_pin_older_than_the_model(user, make_deployment):
    deployment = make_deployment(user, requirements="scikit-learn==1.3.0\n")
    with pytest.raises(StageError) as refused:
        stages.inspect(deployment)
    assert f"requirements pin scikit-learn 1.3.0 but the model was saved with {sklearn.__version__}" in str(
        refused.value
    )
    assert f"Pin scikit-learn=={sklearn.__version__}" in str(refused.value)


def test_inspect_catches_a_scikit_learn_pin_newer_than_the_model(user, make_deployment, iris_rf):
    # The same model as if saved by an older scikit-learn (same length, so the pickle stays valid).
    saved = "1.2.2"
    assert len(saved) == len(sklearn.__version__)
    data = pickle.dumps(iris_rf).replace(sklearn.__version__.encode(), saved.encode())
    deployment = make_deployment(user, model_bytes=data)
    with pytest.raises(StageError) as refused:
        stages.inspect(deployment)
    assert f"requirements pin scikit-learn {sklearn.__version__} but the model was saved with {saved}" in str(
        refused.value
    )


def test_inspect_catches_a_numpy_1_pin_for_a_model_saved_with_numpy_2(user, make_deployment):
    deployment = make_deployment(user, requirements=f"{SKLEARN_PIN}numpy==1.26.4\n")
    with pytest.raises(StageError, match="saved with numpy 2 .* numpy._core"):
        stages.inspect(deployment)


def test_inspect_needs_scikit_learn_in_the_requirements(user, make_deployment):
    deployment = make_deployment(user, requirements="numpy\n")
    with pytest.raises(StageError, match=f"does not list scikit-learn.*add scikit-learn=={sklearn.__version__}"):
        stages.inspect(deployment)


# ------------------------------------------------------------------ environment + validate


def operator_allowed(deployment, *pairs: tuple[str, str]):
    """Skip inspection, as if an operator had allowed these imports: the sandbox must still hold."""
    services.deployment_update(deployment=deployment, allowed_globals=[list(pair) for pair in pairs])
    return deployment


@pytest.fixture
def environment_ready(user, make_deployment):
    """A deployment through inspect and environment; a hostile one skips inspect, as if allowed."""

    def make(model_bytes=None, requirements=SKLEARN_PIN, allow=None):
        deployment = make_deployment(
            user, **({"model_bytes": model_bytes} if model_bytes else {}), requirements=requirements
        )
        if allow:
            operator_allowed(deployment, *allow)
        else:
            stages.inspect(deployment)
        stages.environment(deployment)
        return deployment

    return make


def test_the_environment_is_built_once_and_reused(environment_ready):
    first = environment_ready()
    second = environment_ready()
    assert first.environment_key == second.environment_key
    assert "reused environment" in stages.environment(second)
    python = stages.environment_python(second)
    assert python.exists()
    # ServeML's own packages are not in the model's environment.
    import subprocess

    probe = subprocess.run([python, "-c", "import django"], capture_output=True)
    assert probe.returncode != 0


def test_validate_records_the_signature_and_the_example_in_a_sandbox(environment_ready, iris_rf, monkeypatch, tmp_path):
    # While the probe runs (when a worker could be killed) nothing of it is on disk to leak.
    import tempfile

    from deployments import sandbox

    (scratch := tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_run, on_disk = sandbox.run, []

    def run(launched, **kwargs):
        on_disk.extend(scratch.iterdir())
        return real_run(launched, **kwargs)

    monkeypatch.setattr(sandbox, "run", run)
    deployment = environment_ready()
    summary = stages.validate(deployment)
    assert on_disk == []
    assert summary.startswith("RandomForestClassifier loaded")
    assert deployment.signature["n_features_in"] == 4
    assert deployment.signature["classes"] == [0, 1, 2]
    assert deployment.signature["methods"] == ["predict", "predict_proba"]
    assert deployment.example_request == {"data": [0.0, 0.0, 0.0, 0.0]}
    assert deployment.example_response["prediction"] == iris_rf.predict([[0.0] * 4])[0]
    isolation = deployment.events.get(message__startswith="sandbox").message
    assert isolation.startswith("sandbox: bubblewrap: own uid, user, PID, network, IPC and mount namespaces")


def test_validate_builds_record_examples_from_the_categories_a_model_knows(environment_ready):
    from tests.conftest import PANDAS_PIN

    deployment = environment_ready(dump(corpus.column_transformer()), requirements=PANDAS_PIN)
    stages.validate(deployment)
    assert deployment.example_request == {"data": {"age": 0.0, "income": 0.0, "city": "lyon"}}


@override_settings(SERVEML_SANDBOX_WALL_SECONDS=3)
def test_a_model_that_never_finishes_loading_is_stopped(environment_ready):
    deployment = environment_ready(payloads.call("builtins", "exec", "while True: pass"), allow=[EXEC])
    with pytest.raises(StageError, match="longer than 3 s"):
        stages.validate(deployment)


@override_settings(SERVEML_SANDBOX_MEMORY_BYTES=512 * 1024**2)
def test_a_model_that_allocates_too_much_memory_fails_instead_of_taking_the_host(environment_ready):
    deployment = environment_ready(payloads.call("builtins", "exec", "x = bytearray(8 * 1024**3)"), allow=[EXEC])
    with pytest.raises(StageError, match="MemoryError|memory"):
        stages.validate(deployment)


def test_the_sandbox_has_no_network(environment_ready):
    import socket

    # This test listens on the host's loopback itself (PostgreSQL may not be there: SQLite
    # runs), so without a network namespace of its own the sandbox would connect. In its
    # own namespace nothing listens on that port, and the connection is refused.
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        code = (
            "import socket\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError as exc:\n    raise SystemExit('no network: ' + type(exc).__name__)\n"
            "raise SystemExit('CONNECTED')"
        )
        deployment = environment_ready(payloads.call("builtins", "exec", code), allow=[EXEC])
        with pytest.raises(StageError, match="no network: ConnectionRefusedError") as failed:
            stages.validate(deployment)
    assert "CONNECTED" not in str(failed.value)


# ------------------------------------------------------------------ package + handler


def load_handler(directory):
    """The build context's handler, imported as the Lambda runtime imports it (its folder on sys.path)."""
    import sys

    sys.path.insert(0, str(directory))
    try:
        spec = importlib.util.spec_from_file_location(f"handler_{id(directory)}", directory / "serveml_handler.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(directory))
    return module


def packaged(deployment):
    stages.inspect(deployment)
    stages.package(deployment)
    return load_handler(stages.build_dir(deployment))


def test_package_copies_the_handler_renders_the_dockerfile_and_stores_the_context(user, make_deployment):
    deployment = make_deployment(user)
    stages.inspect(deployment)
    summary = stages.package(deployment)
    assert (
        "serveml_handler.py, serveml_loader.py, serveml_v2.py, serveml.json, Dockerfile, model.pkl, requirements.txt"
        in summary
    )
    assert default_storage.exists(deployment.artifact)
    directory = stages.build_dir(deployment)
    dockerfile = (directory / "Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python:3.11" in dockerfile
    assert 'CMD ["serveml_handler.lambda_handler"]' in dockerfile
    config = json.loads((directory / "serveml.json").read_text())
    assert config["model_file"] == "model.pkl" and config["format"] == "pickle"
    assert ["sklearn.ensemble._forest", "RandomForestClassifier"] in config["allowed_globals"]
    assert (directory / "serveml_handler.py").read_bytes() == buildkit.HANDLER.read_bytes()  # copied, not rendered
    import shutil

    shutil.rmtree(directory)
    assert (stages.restore_context(deployment) / "serveml.json").exists()


def test_the_handler_loads_only_the_globals_the_inspect_stage_found(user, make_deployment):
    deployment = make_deployment(user)
    stages.inspect(deployment)
    services.deployment_update(
        deployment=deployment,
        allowed_globals=[pair for pair in deployment.allowed_globals if pair[1] != "RandomForestClassifier"],
    )
    stages.package(deployment)
    handler = load_handler(stages.build_dir(deployment))
    with pytest.raises(
        Exception,
        match="imports sklearn.ensemble._forest.RandomForestClassifier, which ServeML did not check and allow",
    ):
        handler.model()


@pytest.fixture
def handler(user, make_deployment):
    return packaged(make_deployment(user))


def test_the_handler_answers_api_gateway_v2_and_v1_events(handler, iris_rf):
    import base64
    import json

    row = [6.7, 3.0, 5.2, 2.3]
    expected = int(iris_rf.predict([row])[0])
    v2 = {
        "version": "2.0",
        "requestContext": {"http": {"method": "POST"}},
        "body": json.dumps({"data": row}),
        "isBase64Encoded": False,
    }
    v1 = {
        "httpMethod": "POST",
        "body": base64.b64encode(json.dumps({"data": row}).encode()).decode(),
        "isBase64Encoded": True,
    }
    for event in (v2, v1):
        answer = handler.lambda_handler(event, None)
        assert answer["statusCode"] == 200
        assert json.loads(answer["body"]) == {"prediction": expected, "model_type": "RandomForestClassifier"}


@pytest.mark.parametrize(
    "body, error",
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "each row must be a list of feature values"),
        (b'{"rows": []}', 'request must have "data"'),
        (b'{"instances": []}', '"instances" must be a non-empty list'),
        (b'{"data": [1, 2, 3]}', "expected 4 features per row, got 3"),
        (b'{"data": {"a": 1}}', "not fitted with feature names"),
        (b'{"data": [1, 2, 3, 4], "method": "decision_function"}', "method 'decision_function' is not available"),
        (b'{"data": [1, 2, 3, "x"]}', "the model could not predict this input"),
        (b'{"data": [[1], 2, 3, 4]}', "nested list"),
    ],
)
def test_bad_prediction_input_answers_400_with_a_message(handler, body, error):
    import json

    status, answer = handler.handle(body)
    assert status == 400
    assert error in json.loads(answer)["error"]


def test_the_handler_takes_records_for_a_model_fitted_on_a_dataframe(user, make_deployment):
    import json

    model = corpus.frame_random_forest()
    handler = packaged(make_deployment(user, model_bytes=dump(model)))
    frame = corpus.iris_frame()[0].iloc[::30]
    status, answer = handler.handle(json.dumps({"instances": frame.to_dict(orient="records")}).encode())
    assert status == 200 and json.loads(answer)["predictions"] == model.predict(frame).tolist()
    status, answer = handler.handle(json.dumps({"instances": [{"sepal length (cm)": 1}]}).encode())
    assert status == 400 and "row 0 is missing features: sepal width (cm)" in json.loads(answer)["error"]


def test_the_handler_takes_texts_for_a_text_pipeline(user, make_deployment):
    import json

    model = corpus.text_pipeline()
    handler = packaged(make_deployment(user, model_bytes=dump(model)))
    status, answer = handler.handle(json.dumps({"instances": ["great movie", "awful film"]}).encode())
    assert status == 200 and json.loads(answer)["predictions"] == model.predict(["great movie", "awful film"]).tolist()


def v2_event(headers: dict) -> dict:
    """An HTTP API (payload 2.0) event: API Gateway lower-cases header names, but be ready for any case."""
    return {"version": "2.0", "headers": headers, "body": '{"data": [6.7, 3.0, 5.2, 2.3]}', "isBase64Encoded": False}


@pytest.fixture
def private_function(handler, user, monkeypatch):
    """The packaged handler with the environment ServeML gives a private deployment's Lambda function."""
    from deployments.models import DeploymentKey
    from deployments.targets import aws

    deployment = Deployment.objects.get(owner=user)
    _, live = services.deployment_key_create(deployment=deployment, name="live")
    revoked_row, revoked = services.deployment_key_create(deployment=deployment, name="revoked")
    services.deployment_key_revoke(key=DeploymentKey.objects.get(pk=revoked_row.pk))
    for name, value in aws.access_variables(deployment).items():
        monkeypatch.setenv(name, value)
    return {"handler": handler, "live": live, "revoked": revoked, "deployment": deployment}


def test_a_private_function_refuses_a_call_without_a_key_and_says_how_to_send_one(private_function):
    import json

    answer = private_function["handler"].lambda_handler(v2_event({"content-type": "application/json"}), None)
    assert answer["statusCode"] == 401
    error = json.loads(answer["body"])["error"]
    assert "Authorization: Bearer <key>" in error and "X-API-Key" in error


@pytest.mark.parametrize("which", ["wrong", "revoked"])
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_private_function_refuses_a_wrong_or_revoked_key(private_function, which, header):
    key = "sml_not-a-key-of-this-deployment" if which == "wrong" else private_function["revoked"]
    value = f"Bearer {key}" if header == "authorization" else key
    answer = private_function["handler"].lambda_handler(v2_event({header: value}), None)
    assert answer["statusCode"] == 401


@pytest.mark.parametrize(
    "header", ["authorization", "Authorization", "AUTHORIZATION", "x-api-key", "X-API-Key", "X-Api-Key"]
)
def test_a_private_function_answers_a_live_key_in_either_header_in_any_case(private_function, header, iris_rf):
    import json

    key = private_function["live"]
    value = f"Bearer {key}" if header.lower() == "authorization" else key
    answer = private_function["handler"].lambda_handler(v2_event({header: value}), None)
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"])["prediction"] == int(iris_rf.predict([[6.7, 3.0, 5.2, 2.3]])[0])


def test_a_public_function_answers_without_a_key(private_function, monkeypatch):
    from deployments.targets import aws

    services.deployment_set_private(deployment=private_function["deployment"], private=False)
    for name, value in aws.access_variables(private_function["deployment"]).items():
        monkeypatch.setenv(name, value)
    answer = private_function["handler"].lambda_handler(v2_event({}), None)
    assert answer["statusCode"] == 200


def test_the_lambda_handler_answers_batches_probabilities_and_bad_input(handler, iris_rf):
    import base64
    import json

    rows = corpus.iris()[0][::40].tolist()
    body = json.dumps({"instances": rows, "method": "predict_proba"}).encode()
    event = {"version": "2.0", "body": base64.b64encode(body).decode(), "isBase64Encoded": True}
    answer = handler.lambda_handler(event, None)
    assert answer["statusCode"] == 200 and answer["headers"]["Content-Type"] == "application/json"
    assert json.loads(answer["body"])["predictions"] == iris_rf.predict_proba(rows).tolist()
    bad = handler.lambda_handler({"httpMethod": "POST", "body": '{"data": [1, 2]}'}, None)
    assert bad["statusCode"] == 400 and json.loads(bad["body"]) == {"error": "expected 4 features per row, got 2"}
    garbled = handler.lambda_handler({"body": "%%%", "isBase64Encoded": True}, None)
    assert garbled["statusCode"] == 400


def test_requests_answered_together_get_exactly_their_own_answers(handler):
    import json

    rows = corpus.iris()[0][::10].tolist()
    bodies = [json.dumps({"data": row}).encode() for row in rows[:5]]
    bodies += [
        json.dumps({"instances": rows[5:9]}).encode(),
        json.dumps({"data": rows[9], "method": "predict_proba"}).encode(),
        json.dumps({"instances": rows[10:12], "method": "predict_proba"}).encode(),
        b'{"data": [1, 2, 3]}',  # bad: answered alone, with its own error
        b"not json",
        json.dumps({"data": [1, 2, 3, "x"]}).encode(),
    ]
    assert handler.handle_many(bodies) == [handler.handle(body) for body in bodies]
