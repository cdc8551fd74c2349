"""CSV batch predictions: the check that refuses a file by line number, the batched stream
that appends predictions, and the page's view around them (owner only, CSRF, size bound)."""

import csv
import io
import json
import subprocess
import sys
import textwrap

import httpx
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from deployments import csvbatch
from deployments.models import Deployment
from deployments.runtime import client as runtime_client
from deployments.signatures import ModelSignature

IRIS = ModelSignature(
    model_type="RandomForestClassifier",
    n_features_in=4,
    classes=[0, 1, 2],
    methods=["predict", "predict_proba"],
    input="numbers",
)
NAMED = ModelSignature(
    model_type="Pipeline",
    n_features_in=3,
    feature_names_in=["age", "colour", "height"],
    classes=["no", "yes"],
    methods=["predict", "predict_proba"],
    input="records",
)
NAMED_EXAMPLE = {"age": 0.0, "colour": "red", "height": 0.0}


def as_file(text: str) -> io.BytesIO:
    return io.BytesIO(text.encode())


def refusal(text: str, signature=IRIS, example=None, **kwargs) -> list[str]:
    with pytest.raises(csvbatch.CsvRefused) as caught:
        csvbatch.check(as_file(text), signature, example, max_lines=kwargs.pop("max_lines", 1000), **kwargs)
    return caught.value.lines()


def fake_model(instances: list, method: str) -> list:
    """A model anyone can compute: class = number of features above 1, capped at 2."""

    def values(instance):
        return list(instance.values()) if isinstance(instance, dict) else instance

    def klass(instance):
        return min(sum(1 for v in values(instance) if isinstance(v, float) and v > 1), 2)

    if method == "predict_proba":
        return [[1.0 if klass(i) == k else 0.0 for k in range(3)] for i in instances]
    return [klass(i) for i in instances]


def predicted(text: str, signature=IRIS, example=None, probabilities=False, predict=fake_model, batch_rows=2) -> str:
    binary = as_file(text)
    layout = csvbatch.check(binary, signature, example, max_lines=1000)
    return b"".join(
        csvbatch.predict_lines(
            binary,
            layout,
            predict,
            probabilities=probabilities,
            classes=signature.classes,
            batch_rows=batch_rows,
            max_lines=1000,
        )
    ).decode()


# ------------------------------------------------------------------ the check


def test_a_row_with_the_wrong_number_of_values_is_refused_by_its_line_number():
    text = "a,b,c,d\n1,2,3,4\n\n5,6,7\n"
    assert refusal(text) == ["line 4: expected 4 values, got 3."]


def test_a_value_that_is_not_a_number_is_refused_with_its_column():
    assert refusal("1,2,3,4\n1,2,x,4\n1,2,3,nan\n1,2,,4\n1,2,3,1_000\n") == [
        "line 2: column 3 'x' is not a number.",
        "line 3: column 4 'nan' is not a number.",
        "line 4: column 3 is empty.",
        "line 5: column 4 '1_000' is not a number.",
    ]


def test_a_header_with_an_unknown_or_a_missing_feature_is_refused():
    lines = refusal("age,colour,weight\n1,red,3\n", NAMED, NAMED_EXAMPLE)
    assert lines == [
        "line 1: unknown column 'weight'; the model's features are age, colour, height.",
        "line 1: missing column height.",
    ]
    assert (
        refusal("age,age,height\n1,2,3\n", NAMED, NAMED_EXAMPLE)[-1] == "line 1: column 'age' appears more than once."
    )


def test_a_file_with_many_bad_lines_reports_the_first_twenty_and_counts_the_rest():
    text = "1,2,3,4\n" + "1,2\n" * 50
    lines = refusal(text)
    assert len(lines) == 21
    assert lines[0] == "line 2: expected 4 values, got 2." and lines[19].startswith("line 21:")
    assert lines[-1] == "… and 30 more lines with errors."


def test_an_empty_file_and_a_header_alone_are_refused():
    assert "no rows" in refusal("\n\n")[0]
    assert refusal("a,b,c,d\n") == ["the file has a header but no rows to predict."]


def test_hostile_files_are_refused_without_reading_them_whole():
    assert refusal("1,2,3,4\n" + "9" * 5000 + "\n", max_lines=1000)[0] == "line 2: expected 4 values, got 1."
    with pytest.raises(csvbatch.CsvRefused, match="line 2: longer than 100 characters"):
        list(csvbatch.lines(as_file("1,2,3,4\n" + "9" * 5000 + "\n"), max_line_chars=100))
    assert refusal("1,2,3,4\n" * 20, max_lines=10) == ["the file has more than 10 lines; split it into smaller files."]
    assert refusal('1,2,3,"4\n5"\n')[0].startswith("line 1: a quoted value runs over several lines")
    not_utf8 = io.BytesIO(b"1,2,3,4\n1,2,3,\xff\n")
    with pytest.raises(csvbatch.CsvRefused, match="not UTF-8"):
        csvbatch.check(not_utf8, IRIS, None, max_lines=10)


def test_an_error_quotes_at_most_a_few_dozen_characters_of_a_huge_value():
    [line] = refusal("1,2,3,4\n1,2,3," + "=" * 100_000 + "\n")
    assert len(line) < 100 and line.startswith("line 2: column 4 '=====")


def test_the_header_is_optional_for_numbers_and_a_bom_is_ignored():
    assert csvbatch.check(as_file("\ufeffa,b,c,d\n1,2,3,4\n"), IRIS, None, max_lines=10).header == ["a", "b", "c", "d"]
    layout = csvbatch.check(as_file("1,2,3,4\n5,6,7,8\n"), IRIS, None, max_lines=10)
    assert layout.header is None and layout.rows == 2


# ------------------------------------------------------------------ the stream


def test_the_output_is_the_input_with_a_prediction_column_in_batches():
    calls = []

    def predict(instances, method):
        calls.append(len(instances))
        return fake_model(instances, method)

    out = predicted("a,b,c,d\n0,0,0,0\n2,0,0,0\n2,2,0,0\n-1.5,3,3,3\n0,0,0,0\n", predict=predict)
    assert out.splitlines() == [
        "a,b,c,d,prediction",
        "0,0,0,0,0",
        "2,0,0,0,1",
        "2,2,0,0,2",
        "-1.5,3,3,3,2",
        "0,0,0,0,0",
    ]
    assert calls == [2, 2, 1]


def test_probabilities_add_one_column_per_class():
    out = predicted("1,1,1,1\n2,2,0,0\n", probabilities=True)
    assert out.splitlines() == [
        "x0,x1,x2,x3,prediction,probability_0,probability_1,probability_2",
        "1,1,1,1,0,1.0,0.0,0.0",
        "2,2,0,0,2,0.0,0.0,1.0",
    ]


def test_named_features_go_as_records_in_any_column_order_and_text_stays_text():
    seen = []

    def predict(instances, method):
        seen.extend(instances)
        return ["=yes" if i["colour"] == "red" else "no" for i in instances]

    out = predicted("height,colour,age\n2,red,40\n3,=cmd|' /C calc'!A0,5\n", NAMED, NAMED_EXAMPLE, predict=predict)
    assert seen[0] == {"height": 2.0, "colour": "red", "age": 40.0}
    # A spreadsheet would run these as formulas (OWASP CSV injection): they get a leading apostrophe.
    assert list(csv.reader(io.StringIO(out))) == [
        ["height", "colour", "age", "prediction"],
        ["2", "red", "40", "'=yes"],
        ["3", "'=cmd|' /C calc'!A0", "5", "no"],
    ]


def test_a_batch_the_model_refuses_ends_the_output_with_the_first_line_it_refused():
    def predict(instances, method):
        if any(i[0] == 7 for i in instances):
            raise csvbatch.BatchFailed("the endpoint answered HTTP 400: bad value", refused=True)
        return fake_model(instances, method)

    rows = "".join(f"{n},0,0,0\n" for n in range(10))
    out = predicted(rows, predict=predict, batch_rows=4)
    lines = out.splitlines()
    assert lines[:5] == ["x0,x1,x2,x3,prediction", "0,0,0,0,0", "1,0,0,0,0", "2,0,0,0,1", "3,0,0,0,1"]
    assert lines[-1] == "#ServeML error: line 8: the endpoint answered HTTP 400: bad value"
    assert len(lines) == 6  # header, the batch before the refused one, the error


def test_an_endpoint_that_does_not_answer_stops_the_output_with_the_lines_of_the_batch():
    def predict(instances, method):
        raise csvbatch.BatchFailed("the endpoint did not answer (ConnectError: refused).")

    out = predicted("1,2,3,4\n5,6,7,8\n", predict=predict)
    assert out.splitlines() == [
        "x0,x1,x2,x3,prediction",
        "#ServeML error: lines 1–2: the endpoint did not answer (ConnectError: refused).",
    ]


def test_the_endpoint_sends_instances_and_turns_each_failure_into_a_sentence():
    requests = []

    def answer(request):
        requests.append(json.loads(request.content))
        body = json.loads(request.content)
        if body["instances"][0] == [0.0]:
            return httpx.Response(400, json={"error": "expected 4 features per row, got 1"})
        if body["instances"][0] == [1.0]:
            return httpx.Response(502, text="crashed")
        return httpx.Response(200, json={"predictions": [1] * len(body["instances"])})

    endpoint = csvbatch.Endpoint("http://runtime/predict/x", {}, 5, transport=httpx.MockTransport(answer))
    assert endpoint([[5.0], [6.0]], "predict") == [1, 1]
    assert endpoint([[5.0]], "predict_proba") == [1]
    assert requests[:2] == [{"instances": [[5.0], [6.0]]}, {"instances": [[5.0]], "method": "predict_proba"}]
    with pytest.raises(csvbatch.BatchFailed, match="HTTP 400: expected 4 features") as refused:
        endpoint([[0.0]], "predict")
    assert refused.value.refused
    with pytest.raises(csvbatch.BatchFailed, match="HTTP 502: crashed") as crashed:
        endpoint([[1.0]], "predict")
    assert not crashed.value.refused


class CountingFile(io.FileIO):
    """A file that remembers the largest single read asked of it."""

    largest = 0

    def readinto(self, buffer):
        CountingFile.largest = max(CountingFile.largest, len(buffer))
        return super().readinto(buffer)


def test_a_big_file_is_read_in_small_chunks_and_streamed_a_batch_at_a_time(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write("a,b,c,d\n")
        handle.writelines(f"{n % 3},{n % 5},0.5,{n}\n" for n in range(200_000))
    with CountingFile(path) as raw, io.BufferedReader(raw) as binary:
        layout = csvbatch.check(binary, IRIS, None, max_lines=10**6)
        assert layout.rows == 200_000
        sizes = [
            len(part)
            for part in csvbatch.predict_lines(
                binary, layout, fake_model, probabilities=False, classes=None, batch_rows=5_000, max_lines=10**6
            )
        ]
    assert len(sizes) == 40 and max(sizes) < 200_000
    assert CountingFile.largest <= 64 * 1024


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from deployments import csvbatch
    from deployments.signatures import ModelSignature

    signature = ModelSignature(model_type="m", n_features_in=8, methods=["predict", "predict_proba"], input="numbers")
    def predict(instances, method):
        return [[0.5, 0.5] for _ in instances] if method == "predict_proba" else [1 for _ in instances]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(sys.argv[1], "rb") as binary:
        layout = csvbatch.check(binary, signature, None, max_lines=10**7)
        written = sum(len(part) for part in csvbatch.predict_lines(
            binary, layout, predict, probabilities=True, classes=None, batch_rows=2000, max_lines=10**7))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(layout.rows, written, (after - before) * 1024)
    """
)


def test_a_million_rows_stream_with_bounded_memory(tmp_path):
    path = tmp_path / "million.csv"
    with path.open("w") as handle:
        handle.write(",".join(f"f{i}" for i in range(8)) + "\n")
        row = "5.1,3.5,1.4,0.2,6.7,3.0,5.2,2.3\n"
        for _ in range(100):
            handle.write(row * 10_000)
    size = path.stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True, timeout=300
    )
    rows, written, growth = map(int, done.stdout.split())
    assert rows == 1_000_000 and written > size
    assert growth < 16 * 1024**2 < size, (
        f"peak RSS grew by {growth / 1024**2:.1f} MB for a {size / 1024**2:.0f} MB file"
    )


# ------------------------------------------------------------------ the view


@pytest.fixture
def endpoint(monkeypatch):
    """Every call the CSV view makes to the model, answered by fake_model through httpx.MockTransport."""
    requests = []

    def answer(request):
        requests.append(request)
        body = json.loads(request.content)
        return httpx.Response(200, json={"predictions": fake_model(body["instances"], body.get("method", "predict"))})

    real = httpx.Client
    monkeypatch.setattr(
        csvbatch.httpx, "Client", lambda **kwargs: real(**{**kwargs, "transport": httpx.MockTransport(answer)})
    )
    return requests


def ready(deployment, **fields) -> Deployment:
    values = {
        "status": Deployment.Status.READY,
        "endpoint_url": f"http://127.0.0.1:8001/predict/{deployment.public_id}",
        "example_request": {"data": [0.0, 0.0, 0.0, 0.0]},
        "signature": {
            "model_type": "RandomForestClassifier",
            "n_features_in": 4,
            "classes": [0, 1, 2],
            "methods": ["predict", "predict_proba"],
            "input": "numbers",
        },
    }
    Deployment.objects.filter(pk=deployment.pk).update(**{**values, **fields})
    deployment.refresh_from_db()
    return deployment


def post_csv(client, deployment, text: str, **data):
    url = reverse("deployment-predict-csv", args=[deployment.public_id])
    upload = SimpleUploadedFile("rows.csv", text.encode(), content_type="text/csv")
    return client.post(url, {"csv_file": upload, **data})


def body(response) -> str:
    return b"".join(response.streaming_content).decode()


def test_the_ready_page_has_the_csv_form_with_probabilities_and_no_key(client, user, make_deployment):
    deployment = ready(make_deployment(user))
    client.force_login(user)
    page = client.get(deployment.get_absolute_url()).content.decode()
    assert 'id="csv-form"' in page and 'name="probabilities"' in page and "csvbatch.js" in page
    assert 'name="key"' not in page and "csrfmiddlewaretoken" in page


def test_the_owner_gets_the_csv_back_predicted_through_the_runtime_with_its_internal_header(
    client, user, make_deployment, endpoint
):
    deployment = ready(make_deployment(user))
    client.force_login(user)
    response = post_csv(client, deployment, "a,b,c,d\n2,2,0,0\n0,0,0,0\n", probabilities="1")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv") and response["X-ServeML-Rows"] == "2"
    assert "attachment" in response["Content-Disposition"]
    assert body(response).splitlines() == [
        "a,b,c,d,prediction,probability_0,probability_1,probability_2",
        "2,2,0,0,2,0.0,0.0,1.0",
        "0,0,0,0,0,1.0,0.0,0.0",
    ]
    assert [str(r.url) for r in endpoint] == [runtime_client.internal_endpoint_url(deployment.public_id)] * 2
    assert all(
        r.headers["x-serveml-internal"] == runtime_client.internal_headers()["X-ServeML-Internal"] for r in endpoint
    )


def test_an_upload_streams_back_whole_from_its_temporary_file_one_part_per_batch(
    client, user, make_deployment, endpoint, settings
):
    settings.SERVEML_CSV_BATCH_ROWS = 1_000
    deployment = ready(make_deployment(user))
    client.force_login(user)
    response = post_csv(client, deployment, "a,b,c,d\n" + "2,0,0,0\n" * 20_000)
    parts = list(response.streaming_content)
    assert response["X-ServeML-Rows"] == "20000" and len(endpoint) == 20
    assert len(parts) == 20  # one part per batch, as it is predicted
    lines = b"".join(parts).decode().splitlines()
    assert len(lines) == 20_001 and set(lines[1:]) == {"2,0,0,0,1"}


def test_a_file_that_does_not_fit_is_refused_up_front_by_line_number_and_nothing_is_predicted(
    client, user, make_deployment, endpoint
):
    deployment = ready(make_deployment(user))
    client.force_login(user)
    response = post_csv(client, deployment, "1,2,3,4\n" * 16 + "1,2,3\n")
    assert response.status_code == 400 and response["Content-Type"].startswith("text/plain")
    assert "line 17: expected 4 values, got 3." in response.content.decode()
    assert endpoint == []


def test_only_the_owner_of_a_ready_deployment_can_predict_a_csv(client, user, other_user, make_deployment, endpoint):
    deployment = make_deployment(user)
    client.force_login(user)
    assert post_csv(client, deployment, "1,2,3,4\n").status_code == 409  # not ready yet
    ready(deployment)
    client.force_login(other_user)
    assert post_csv(client, deployment, "1,2,3,4\n").status_code == 404
    client.logout()
    assert post_csv(client, deployment, "1,2,3,4\n").status_code == 302  # to the sign-in page
    assert endpoint == []


def test_the_csv_form_needs_the_csrf_token(user, make_deployment, endpoint):
    deployment = ready(make_deployment(user))
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert post_csv(browser, deployment, "1,2,3,4\n").status_code == 403
    page = browser.get(deployment.get_absolute_url())
    token = page.context["csrf_token"]
    assert post_csv(browser, deployment, "1,2,3,4\n", csrfmiddlewaretoken=str(token)).status_code == 200


def test_a_csv_over_the_size_setting_is_refused_with_the_limit(client, user, make_deployment, endpoint, settings):
    settings.SERVEML_MAX_CSV_BYTES = 1024
    deployment = ready(make_deployment(user))
    client.force_login(user)
    response = post_csv(client, deployment, "1,2,3,4\n" * 1000)
    assert response.status_code == 413 and "larger than" in response.content.decode()
    assert endpoint == []


def test_a_private_aws_endpoint_needs_a_pasted_key_and_never_gets_the_runtime_token(
    client, user, make_deployment, endpoint
):
    deployment = ready(
        make_deployment(user), target=Deployment.Target.AWS, is_private=True, endpoint_url="https://abc.example/"
    )
    client.force_login(user)
    asked = post_csv(client, deployment, "1,2,3,4\n")
    assert asked.status_code == 400 and "paste one of its API keys" in asked.content.decode() and endpoint == []
    assert body(post_csv(client, deployment, "1,2,3,4\n", key="sml_abc")).startswith("x0,x1,x2,x3,prediction\n")
    [request] = endpoint
    assert str(request.url) == "https://abc.example/"
    assert request.headers["authorization"] == "Bearer sml_abc" and "x-serveml-internal" not in request.headers


# ------------------------------------------------------------------ with the real runtime


@pytest.fixture
def token(user):
    from rest_framework.authtoken.models import Token

    return Token.objects.create(user=user).key


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_records_and_texts_are_predicted_by_the_real_model_exactly_like_model_predict(
    stack, live_server, token, client, user
):
    import pandas

    from deployments.allowlist import corpus
    from tests.conftest import PANDAS_PIN, SKLEARN_PIN
    from tests.test_end_to_end import deploy, wait_ready

    frame_model, text_model = corpus.column_transformer(), corpus.text_pipeline()
    frame_body = deploy(live_server, token, frame_model, PANDAS_PIN, name="frame")
    text_body = deploy(live_server, token, text_model, SKLEARN_PIN, name="texts")
    client.force_login(user)

    frame, _ = corpus.mixed_frame()
    columns = ["city", "income", "age"]  # not the order the model was fitted in
    text = frame[columns].to_csv(index=False)
    wait_ready(stack, token, frame_body)
    response = post_csv(client, Deployment.objects.get(public_id=frame_body["id"]), text, probabilities="1")
    table = list(csv.reader(io.StringIO(body(response))))
    assert table[0] == [*columns, "prediction", "probability_0", "probability_1"]
    assert [int(row[3]) for row in table[1:]] == frame_model.predict(frame).tolist()
    expected = frame_model.predict_proba(frame)
    assert all(abs(float(row[4]) - p) < 1e-9 for row, p in zip(table[1:], expected[:, 0], strict=True))
    assert [row[:3] for row in table[1:]] == list(csv.reader(io.StringIO(text)))[1:]

    docs, _ = corpus.texts()
    wait_ready(stack, token, text_body)
    text_deployment = Deployment.objects.get(public_id=text_body["id"])
    answer = body(post_csv(client, text_deployment, pandas.DataFrame({"review": docs}).to_csv(index=False)))
    table = list(csv.reader(io.StringIO(answer)))
    assert table[0] == ["review", "prediction"]
    assert [int(row[1]) for row in table[1:]] == text_model.predict(docs).tolist()
