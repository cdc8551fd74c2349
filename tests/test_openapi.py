"""OpenAPI: the REST API's generated document and docs page, and each deployment's own
document built from its model's signature (deployments/openapi.py)."""

import json
import re

import jsonschema
import pytest
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from deployments import openapi
from deployments.models import Deployment
from tests.test_browser import browser  # noqa: F401 (the module's Chromium, shared)

pytestmark = pytest.mark.django_db

IRIS_SIGNATURE = {
    "model_type": "RandomForestClassifier",
    "n_features_in": 4,
    "feature_names_in": None,
    "classes": [0, 1, 2],
    "methods": ["predict", "predict_proba"],
    "sklearn_version": "1.5.2",
    "input": "numbers",
    "example_outputs": {"predict": 0, "predict_proba": [1.0, 0.0, 0.0]},
}
FRAME_SIGNATURE = {
    "model_type": "Pipeline",
    "n_features_in": 3,
    "feature_names_in": ["age", "city", "income"],
    "classes": ["no", "yes"],
    "methods": ["predict", "predict_proba", "decision_function"],
    "input": "records",
    "example_outputs": {"predict": "no"},
}
FRAME_EXAMPLE = {"data": {"age": 0.0, "city": "Lisbon", "income": 0.0}}


@pytest.fixture
def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def request_validator(document: dict):
    """A JSON Schema validator for the document's request body (OpenAPI 3.0 schemas are JSON Schema here)."""
    root = {"$ref": "#/components/schemas/PredictionRequest", "components": document["components"]}
    return jsonschema.Draft7Validator(root)


def response_validator(document: dict):
    schema = document["paths"][next(iter(document["paths"]))]["post"]["responses"]["200"]
    root = {**schema["content"]["application/json"]["schema"], "components": document["components"]}
    return jsonschema.Draft7Validator(root)


# ------------------------------------------------------------------ the REST API


def test_the_rest_api_schema_is_valid_openapi_and_describes_errors_and_token_auth(client):
    response = client.get("/api/schema", HTTP_ACCEPT="application/json")
    assert response.status_code == 200  # public: the API's shape is no secret
    schema = json.loads(response.content)
    validate(schema)
    assert (
        schema["components"]["securitySchemes"]["tokenAuth"].items()
        >= {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
        }.items()
    )
    deploy = schema["paths"]["/api/deploy"]["post"]
    assert set(deploy["responses"]) == {"202", "400", "401"}
    upload = schema["components"]["schemas"]["DeployUploadRequest"]
    assert upload["required"] == ["model_file", "requirements_file"]
    assert upload["properties"]["model_file"]["format"] == "binary"
    assert set(schema["paths"]["/api/deployments/{public_id}"]["delete"]["responses"]) == {
        "200",
        "202",
        "401",
        "404",
        "409",
        "502",
    }
    assert set(schema["paths"]["/api/token"]["post"]["responses"]) == {"200", "400", "429"}
    assert "/api/deployments/{public_id}/openapi.json" in schema["paths"]


def test_a_call_without_credentials_is_a_json_401_that_says_how_to_authenticate(client):
    response = client.get("/api/deployments")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
    assert response.json() == {"error": "Authentication credentials were not provided."}


def test_unknown_api_urls_and_malformed_ids_answer_json_404s(api):
    for url in ("/api/deployments/not-a-uuid", "/api/nothing-here", "/api/deployments/null,null/keys"):
        response = api.post(url) if url.endswith("keys") else api.get(url)
        assert response.status_code == 404 and response["Content-Type"] == "application/json"
        assert "No API endpoint answers at this URL" in response.json()["error"]


def test_another_users_deployment_is_a_json_404(api, other_user, make_deployment):
    theirs = make_deployment(other_user)
    response = api.get(f"/api/deployments/{theirs.public_id}")
    assert response.status_code == 404 and response.json()["error"].startswith("No deployment with this id is yours")


def test_the_docs_page_loads_swagger_ui_from_this_server_only(client):
    page = client.get("/api/docs").content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in sources
    assert all(s.startswith("/") for s in sources), sources  # no CDN: this machine may have no internet
    assert "/api/schema" in page


@pytest.mark.browser
def test_the_docs_page_renders_the_api_with_no_network_but_this_server(browser, live_server):  # noqa: F811
    context = browser.new_context()
    outside = []

    def only_here(route):
        if route.request.url.startswith(live_server.url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    context.route("**/*", only_here)
    page = context.new_page()
    page.goto(f"{live_server.url}/api/docs")
    page.get_by_text("Upload a model and its requirements.txt").wait_for(timeout=20_000)
    assert page.locator(".opblock").count() == 16  # every operation, from the schema it fetched
    assert outside == []
    context.close()


# ------------------------------------------------------------------ one deployment's document


def test_a_numeric_models_document_describes_its_rows_methods_and_classes():
    document = openapi.prediction_document(
        title="iris",
        endpoint_url="http://127.0.0.1:8001/predict/0b8f6c2e-5f0e-4c0a-9d55-1f0f3f3f3f3f",
        signature=IRIS_SIGNATURE,
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
    )
    validate(document)
    assert document["servers"] == [{"url": "http://127.0.0.1:8001"}]
    operation = document["paths"]["/predict/0b8f6c2e-5f0e-4c0a-9d55-1f0f3f3f3f3f"]["post"]
    assert "401" not in operation["responses"] and "security" not in operation  # public
    row = document["components"]["schemas"]["Row"]
    assert row["minItems"] == row["maxItems"] == 4 and row["items"] == {"type": "number", "nullable": True}
    method = document["components"]["schemas"]["OneRow"]["properties"]["method"]
    assert method["enum"] == ["predict", "predict_proba"]
    requests = request_validator(document)
    for example in operation["requestBody"]["content"]["application/json"]["examples"].values():
        requests.validate(example["value"])
    assert not requests.is_valid({"data": [1.0, 2.0, 3.0]})
    assert not requests.is_valid({"data": [1, 2, 3, 4], "method": "decision_function"})
    answers = response_validator(document)
    answers.validate({"prediction": 2, "model_type": "RandomForestClassifier"})
    answers.validate({"predictions": [[0.1, 0.2, 0.7]], "model_type": "RandomForestClassifier"})
    assert not answers.is_valid({"prediction": 7, "model_type": "RandomForestClassifier"})  # not a class
    assert not answers.is_valid({"predictions": [[0.5, 0.5]], "model_type": "x"})  # three classes


def test_a_dataframe_models_document_names_its_columns_and_their_types():
    document = openapi.prediction_document(
        title="frame",
        endpoint_url="https://abc.execute-api.eu-west-1.amazonaws.com/",
        signature=FRAME_SIGNATURE,
        example_request=FRAME_EXAMPLE,
        private=True,
    )
    validate(document)
    assert list(document["paths"]) == ["/"]
    record, in_order = document["components"]["schemas"]["Row"]["anyOf"]
    assert record["required"] == ["age", "city", "income"]
    assert record["properties"]["city"] == {"type": "string", "example": "Lisbon"}
    assert record["properties"]["age"] == {"type": "number", "nullable": True}
    assert in_order["minItems"] == in_order["maxItems"] == 3
    requests = request_validator(document)
    requests.validate({"instances": [{"age": 40, "city": "Porto", "income": 1.5}]})
    assert not requests.is_valid({"data": {"age": 40, "city": "Porto"}})  # a column missing
    assert not requests.is_valid({"data": {"age": 40, "city": "Porto", "income": 1, "extra": 2}})
    operation = document["paths"]["/"]["post"]
    assert operation["security"] == [{"bearerKey": []}, {"apiKeyHeader": []}]
    assert "401" in operation["responses"]


def test_hostile_strings_from_a_signature_stay_json_and_are_bounded():
    hostile = '</script><script>alert(1)</script>"'
    signature = {
        **FRAME_SIGNATURE,
        "model_type": hostile * 50,
        "feature_names_in": [hostile, "b", "c"],
        "classes": [hostile, "x" * 10_000],
    }
    document = openapi.prediction_document(
        title=hostile, endpoint_url="http://h/predict/x", signature=signature, example_request=FRAME_EXAMPLE
    )
    validate(document)
    text = json.dumps(document)
    assert len(document["info"]["title"]) <= openapi.MAX_TITLE + 40
    assert "x" * (openapi.MAX_STRING + 1) not in text  # a class label too long to list
    assert document["components"]["schemas"]["Row"]["anyOf"][0]["required"][0] == hostile  # a key, JSON-escaped
    many = openapi.prediction_document(
        title="wide",
        endpoint_url="http://h/predict/x",
        signature={**IRIS_SIGNATURE, "n_features_in": 50_000, "feature_names_in": [f"f{i}" for i in range(50_000)]},
    )
    assert len(json.dumps(many)) < 20_000  # described by length, not one property per column
    assert many["components"]["schemas"]["Row"]["minItems"] == 50_000
    junk = openapi.prediction_document(
        title=None, endpoint_url="", signature={"methods": "predict", "classes": {"a": 1}, "n_features_in": True}
    )
    validate(junk)


def test_the_web_app_serves_a_deployments_document_to_its_owner_only(api, user, other_user, make_deployment, client):
    deployment = make_deployment(user)
    url = f"/api/deployments/{deployment.public_id}/openapi.json"
    not_yet = api.get(url)
    assert not_yet.status_code == 409 and "once it is ready" in not_yet.json()["error"]
    Deployment.objects.filter(pk=deployment.pk).update(
        status=Deployment.Status.READY,
        signature=IRIS_SIGNATURE,
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
        endpoint_url=f"http://127.0.0.1:8001/predict/{deployment.public_id}",
    )
    document = api.get(url).json()
    validate(document)
    assert f"/predict/{deployment.public_id}" in document["paths"]
    assert client.get(url).status_code == 401
    api.force_authenticate(other_user)
    assert api.get(url).status_code == 404


def test_the_ready_page_links_the_document(client, user, make_deployment):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(
        status=Deployment.Status.READY,
        signature=IRIS_SIGNATURE,
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
        endpoint_url=f"http://127.0.0.1:8001/predict/{deployment.public_id}",
    )
    client.force_login(user)
    page = client.get(f"/deployments/{deployment.public_id}").content.decode()
    assert f'href="/api/deployments/{deployment.public_id}/openapi.json"' in page


def test_a_key_request_that_is_not_an_object_with_a_string_name_is_a_400(api, user, make_deployment):
    deployment = make_deployment(user)
    url = f"/api/deployments/{deployment.public_id}/keys"
    for body in ([1, 2], {"name": 5}, {"name": ["a"]}, "text"):
        response = api.post(url, body, format="json")
        assert response.status_code == 400 and "as a string" in response.json()["error"], body
    named_with_a_nul = api.post(url, {"name": "a\x00b"}, format="json")
    assert named_with_a_nul.status_code == 400 and "NUL" in named_with_a_nul.json()["error"]
    assert not deployment.keys.exists()
    assert api.post(url, {"name": "x" * 300}, format="json").json()["name"] == "x" * 100


def test_a_deployments_document_describes_the_version_that_serves_its_url(api, user, make_deployment):
    root, second = make_deployment(user), make_deployment(user, name="second")
    ready = {"status": Deployment.Status.READY, "example_request": {"data": [0.0, 0.0, 0.0, 0.0]}}
    Deployment.objects.filter(pk=root.pk).update(
        **ready, signature=IRIS_SIGNATURE, endpoint_url=f"http://127.0.0.1:8001/predict/{root.public_id}"
    )
    Deployment.objects.filter(pk=second.pk).update(
        **ready,
        version_of=root,
        version=2,
        signature={**IRIS_SIGNATURE, "model_type": "LogisticRegression", "methods": ["predict", "decision_function"]},
        endpoint_url=f"http://127.0.0.1:8001/predict/{second.public_id}",
    )
    Deployment.objects.filter(pk=root.pk).update(serving=second, is_private=True)
    document = api.get(f"/api/deployments/{root.public_id}/openapi.json").json()
    assert list(document["paths"]) == [f"/predict/{root.public_id}"]  # the stable URL…
    operation = document["paths"][f"/predict/{root.public_id}"]["post"]
    assert operation["summary"] == "Predict with this LogisticRegression"  # …answered by version 2
    assert document["components"]["schemas"]["OneRow"]["properties"]["method"]["enum"] == [
        "predict",
        "decision_function",
    ]
    assert "security" in operation  # the deployment's privacy
    own = api.get(f"/api/deployments/{second.public_id}/openapi.json").json()
    assert (
        list(own["paths"]) == [f"/predict/{second.public_id}"]
        and "security" in own["paths"][f"/predict/{second.public_id}"]["post"]
    )
