"""The `serveml` command-line client (cli/), installed into the test venv, driven as a person
would: a real process against the real web app, worker and runtime."""

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rest_framework.authtoken.models import Token

from deployments.allowlist import corpus
from tests import payloads
from tests.conftest import SKLEARN_PIN, dump, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SERVEML = str(Path(sys.executable).parent / "serveml")
X_IRIS, _ = corpus.iris()


@pytest.fixture
def terminal(tmp_path):
    """Runs `serveml ...` with its own config file; returns (exit code, stdout, stderr)."""
    env = {**os.environ, "SERVEML_CONFIG": str(tmp_path / "config" / "config.json"), "COLUMNS": "200"}

    def run(*args, stdin: str = "", timeout: float = 60):
        done = subprocess.run(
            [SERVEML, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path
        )
        return done.returncode, done.stdout, done.stderr

    run.config = tmp_path / "config" / "config.json"
    return run


@pytest.fixture
def files(tmp_path):
    model, requirements = tmp_path / "model.pkl", tmp_path / "requirements.txt"
    model.write_bytes(dump(corpus.random_forest()))
    requirements.write_text(SKLEARN_PIN)
    return str(model), str(requirements)


def sign_in(terminal, live_server):
    code, out, err = terminal("login", live_server.url, stdin="alice\ncorrect-horse-42\n")
    assert code == 0, err
    return out


def test_a_person_signs_in_deploys_predicts_and_stops_from_the_terminal(
    stack, live_server, user, terminal, files, tmp_path
):
    code, _, err = terminal("login", live_server.url, stdin="alice\nwrong\n")
    assert code == 1 and "Wrong username or password" in err and not terminal.config.exists()

    said = sign_in(terminal, live_server)
    assert f"Signed in to {live_server.url} as alice" in said
    assert stat.S_IMODE(terminal.config.stat().st_mode) == 0o600
    assert stat.S_IMODE(terminal.config.parent.stat().st_mode) == 0o700
    assert json.loads(terminal.config.read_text())["token"] == Token.objects.get(user=user).key

    code, out, err = terminal("deploy", *files, "--name", "iris", timeout=400)
    assert code == 0, out + err
    lines = out.splitlines()
    # each stage as it finished, in order, with its duration; then the URL and a curl line
    done = [line.split()[1] for line in lines if line.strip().startswith("✓")]
    assert done == ["inspect", "environment", "validate", "package", "provision", "verify"]
    ready = next(line for line in lines if line.startswith("Ready."))
    url = ready.split("Prediction URL: ")[1]
    assert url.startswith(f"{stack.runtime_url}/predict/")
    curl = next(line for line in lines if line.startswith("curl -X POST"))
    called = subprocess.run(["bash", "-c", curl + " -s"], capture_output=True, text=True, timeout=30)
    assert json.loads(called.stdout) == {"prediction": 0, "model_type": "RandomForestClassifier"}
    deployment_id = url.rsplit("/", 1)[1]
    model = corpus.random_forest()

    code, out, _ = terminal("list")
    assert code == 0 and deployment_id[:8] in out and "ready" in out and url in out
    code, out, _ = terminal("status", deployment_id[:8])
    assert code == 0 and "ready" in out and "endpoint answered the example request" in out

    row = X_IRIS[60].tolist()
    code, out, err = terminal("predict", "iris", "--data", json.dumps(row))
    assert code == 0, err
    assert json.loads(out) == {"prediction": model.predict([row])[0].item(), "model_type": "RandomForestClassifier"}
    code, out, _ = terminal(
        "predict", deployment_id, "--data", json.dumps(X_IRIS[:3].tolist()), "--method", "predict_proba"
    )
    assert json.loads(out)["predictions"] == model.predict_proba(X_IRIS[:3]).tolist()

    table = tmp_path / "rows.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sepal length", "sepal width", "petal length", "petal width"])
        writer.writerows(X_IRIS.tolist())
    code, out, err = terminal("predict", "iris", "--csv", str(table))
    assert code == 0, err
    answered = list(csv.reader(io.StringIO(out)))
    assert answered[0] == ["sepal length", "sepal width", "petal length", "petal width", "prediction"]
    assert [int(r[-1]) for r in answered[1:]] == model.predict(X_IRIS).tolist()  # 150 rows

    code, _, err = terminal("predict", "iris", "--csv", str(table), "--batch-rows", "40", "-o", "out.csv")
    assert code == 0 and "Wrote 150 predicted rows to out.csv" in err
    assert list(csv.reader((tmp_path / "out.csv").open())) == answered  # four requests, the same answer
    table.write_text("1,2,3,4\n5,6,7,8\n1,2,3\n")
    code, _, err = terminal("predict", "iris", "--csv", str(table), "--batch-rows", "2")
    assert code == 1 and f"lines 3–3 of {table}: The model refused the input: expected 4 features" in err

    code, _, err = terminal("predict", "iris", "--data", "[1, 2, 3]")
    assert code == 1 and "expected 4 features per row, got 3" in err
    code, _, err = terminal("predict", "iris", "--data", "[1, 2,")
    assert code == 1 and "--data is not JSON" in err

    # a new version at the same URL, followed live like the first; then back to version 1
    (tmp_path / "v2.pkl").write_bytes(dump(corpus.logistic_regression()))
    code, out, err = terminal("deploy", str(tmp_path / "v2.pkl"), files[1], "--version-of", "iris", timeout=400)
    assert code == 0, out + err
    assert "Uploaded: version 2 of iris" in out and f"Ready. Version 2 serves {url}" in out
    assert [line.split()[1] for line in out.splitlines() if line.strip().startswith("✓")][0] == "inspect"
    assert httpx.post(url, json={"data": row}).json()["model_type"] == "LogisticRegression"
    described = httpx.get(f"{url}/openapi.json").json()  # the URL's document follows the version it serves
    assert next(iter(described["paths"].values()))["post"]["summary"] == "Predict with this LogisticRegression"
    code, out, _ = terminal("versions", "iris", "--json")
    assert code == 0 and [(v["version"], v["serving"]) for v in json.loads(out)] == [(2, True), (1, False)]
    code, out, _ = terminal("versions", "iris")
    assert code == 0 and "●" in out and "version" in out
    code, out, _ = terminal("promote", "iris", "1")
    assert code == 0 and f"Version 1 now serves {url}" in out
    assert httpx.post(url, json={"data": row}).json()["model_type"] == "RandomForestClassifier"

    code, out, _ = terminal("stop", "iris")
    assert code == 0 and "Stopped iris" in out
    assert httpx.post(url, json={"data": row}).status_code == 404
    code, _, err = terminal("predict", "iris", "--data", json.dumps(row))
    assert code == 1 and "iris is stopped, not ready" in err


def test_a_deployment_that_fails_shows_why_and_exits_non_zero(stack, live_server, user, terminal, tmp_path):
    sign_in(terminal, live_server)
    model, requirements = tmp_path / "model.pkl", tmp_path / "requirements.txt"
    model.write_bytes(payloads.call("os", "system", "true"))
    requirements.write_text(SKLEARN_PIN)
    code, out, err = terminal("deploy", str(model), str(requirements), timeout=200)
    assert code == 1
    assert "error: Deployment failed in the inspect stage:" in err and "os.system" in err
    assert "Ready." not in out


def test_mistakes_get_an_answer_that_says_what_to_do(live_server, user, terminal, files, tmp_path):
    code, _, err = terminal("list")
    assert code == 1 and "Not signed in: run `serveml login URL` first" in err
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = terminal("login", closed, stdin="alice\ncorrect-horse-42\n")
    assert code == 1 and f"Cannot reach ServeML at {closed}" in err and "Is it running" in err
    code, _, err = terminal("login", "example.org", stdin="")
    assert code == 1 and "is not a URL" in err

    sign_in(terminal, live_server)
    code, _, err = terminal("deploy", str(tmp_path / "missing.pkl"), files[1])
    assert code == 1 and "does not exist" in err
    code, _, err = terminal("deploy", files[1], files[1])  # requirements.txt as the model
    assert code == 1 and "The upload was refused: This is not a model file ServeML can read" in err
    code, _, err = terminal("status", "nothing-like-this")
    assert code == 1 and "No deployment of yours" in err and "serveml list" in err

    Token.objects.filter(user=user).delete()  # signed out elsewhere
    code, _, err = terminal("list")
    assert code == 1 and "refused your token" in err and "serveml login" in err
