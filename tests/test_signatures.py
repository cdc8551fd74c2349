"""The probe's report is parsed into typed values; the inspect stage's findings have columns of their own."""

import json

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from rest_framework.test import APIClient

from deployments import buildkit
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError
from deployments.signatures import ModelSignature, ProbeReport, SignatureError

# What deployments/buildkit/probe.py writes for the iris random forest.
REPORT = {
    "signature": {
        "model_type": "RandomForestClassifier",
        "estimator": "sklearn.ensemble._forest.RandomForestClassifier",
        "steps": [],
        "n_features_in": 4,
        "feature_names_in": None,
        "classes": [0, 1, 2],
        "methods": ["predict", "predict_proba"],
        "sklearn_version": "1.5.2",
        "python_version": "3.11.7",
        "input": "numbers",
    },
    "example": [0.0, 0.0, 0.0, 0.0],
    "outputs": {"predict": 0, "predict_proba": [1.0, 0.0, 0.0]},
}


def report(**signature):
    return {**REPORT, "signature": {**REPORT["signature"], **signature}}


def test_the_probes_report_reads_back_as_it_was_written():
    parsed = ProbeReport.parse(REPORT)
    signature = parsed.signature.with_outputs(parsed.outputs)
    assert signature.as_json() == {**REPORT["signature"], "example_outputs": REPORT["outputs"]}
    assert ModelSignature.from_stored(signature.as_json()) == signature
    assert parsed.example == [0.0, 0.0, 0.0, 0.0] and signature.features() == "4 features"


def test_keys_the_probe_does_not_write_are_dropped():
    parsed = ProbeReport.parse(report(trusted_types=["os.system"], allowed_globals=[["os", "system"]]))
    assert "trusted_types" not in parsed.signature.as_json()
    assert "allowed_globals" not in parsed.signature.as_json()


def test_the_probe_cannot_write_servemls_own_record_of_its_outputs():
    parsed = ProbeReport.parse({**report(example_outputs={"predict": 42}), "error": "no predict method"})
    assert parsed.signature.example_outputs is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("model_type", "<script>alert(1)</script>"),
        ("model_type", ""),
        ("model_type", 7),
        ("n_features_in", "4"),
        ("n_features_in", True),
        ("n_features_in", -1),
        ("feature_names_in", "sepal"),
        ("feature_names_in", [1, 2]),
        ("classes", {"a": 1}),
        ("classes", [{"nested": "object"}]),
        ("methods", ["predict", "__reduce__"]),
        ("methods", ["predict", "predict"]),
        ("sklearn_version", "1.5.2; rm -rf /"),
        ("input", "pickle"),
        ("steps", ["Pipeline", "os.system"]),
        ("estimator", "sklearn ensemble"),
    ],
)
def test_a_key_of_the_wrong_type_refuses_the_whole_report(key, value):
    with pytest.raises(SignatureError, match=key):
        ProbeReport.parse(report(**{key: value}))


@pytest.mark.parametrize(
    "hostile",
    [
        [],
        {"signature": "RandomForestClassifier", "outputs": {"predict": 0}, "example": [0.0]},
        {**REPORT, "outputs": {"predict_proba": [1.0]}},  # no predict
        {**REPORT, "outputs": {"predict": 0, "decision_function": [1.0]}},  # a method it does not have
        {**REPORT, "outputs": {"predict": float("inf")}},
        {**REPORT, "example": {"a": {"b": "c"}}},
        {**REPORT, "error": ["not", "text"]},
    ],
)
def test_a_report_that_is_not_what_the_probe_writes_is_refused(hostile):
    with pytest.raises(SignatureError):
        ProbeReport.parse(hostile)


def test_an_error_report_keeps_the_signature_and_the_error():
    parsed = ProbeReport.parse({"signature": REPORT["signature"], "error": "x" * 10_000})
    assert parsed.signature.model_type == "RandomForestClassifier"
    assert len(parsed.error) == 4_000


def test_a_stored_signature_loses_only_what_does_not_parse():
    stored = {**REPORT["signature"], "n_features_in": "four", "pickled_sklearn_version": "1.5.2"}
    signature = ModelSignature.from_stored(stored)
    assert signature.n_features_in is None and signature.classes == [0, 1, 2]
    assert ModelSignature.from_stored({}) == ModelSignature() and ModelSignature().as_json() == {}


@pytest.mark.django_db
def test_the_api_shows_the_signature_in_its_old_shape(user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)
    deployment = make_deployment(user)
    api = APIClient()
    api.force_authenticate(user)
    assert api.get(f"/api/deployments/{deployment.public_id}").json()["signature"] == {}
    stored = ProbeReport.parse(REPORT).signature.with_outputs(REPORT["outputs"]).as_json()
    deployment.__class__.objects.filter(pk=deployment.pk).update(pickled_sklearn_version="", signature=stored)
    body = api.get(f"/api/deployments/{deployment.public_id}").json()
    # As the validate stage stored it before: the probe's keys, its outputs, and what inspect read.
    assert body["signature"] == {**stored, "pickled_sklearn_version": None}
    assert set(body["signature"]) == {*REPORT["signature"], "example_outputs", "pickled_sklearn_version"}


@pytest.mark.django_db(transaction=True)
def test_the_migration_moves_what_inspect_found_out_of_the_signature(user):
    executor = MigrationExecutor(connection)
    executor.migrate([("deployments", "0006_claim_lease_and_progress")])
    try:
        old = executor.loader.project_state([("deployments", "0006_claim_lease_and_progress")]).apps
        Deployment = old.get_model("deployments", "Deployment")
        legacy = {**REPORT["signature"], "pickled_sklearn_version": "1.5.2"}
        skops = {
            **REPORT["signature"],
            "pickled_sklearn_version": None,
            "trusted_types": ["sklearn.ensemble._forest.RandomForestClassifier", "numpy.ndarray"],
        }
        rows = [
            Deployment.objects.create(owner_id=user.pk, name=name, signature=signature, allowed_globals=allowed)
            for name, signature, allowed in (
                ("pickle", legacy, [["sklearn.ensemble._forest", "RandomForestClassifier"]]),
                ("skops before 0005", skops, []),
                ("queued", {}, []),
            )
        ]
        executor = MigrationExecutor(connection)
        executor.migrate([("deployments", "0007_trusted_types")])
        new = executor.loader.project_state([("deployments", "0007_trusted_types")]).apps
        Deployment = new.get_model("deployments", "Deployment")
        pickled, skopsed, queued = (Deployment.objects.get(pk=row.pk) for row in rows)
        assert pickled.signature == REPORT["signature"] and pickled.pickled_sklearn_version == "1.5.2"
        assert pickled.allowed_globals == [["sklearn.ensemble._forest", "RandomForestClassifier"]]
        assert skopsed.signature == REPORT["signature"] and skopsed.pickled_sklearn_version == ""
        assert skopsed.allowed_globals == [["numpy", "ndarray"], ["sklearn.ensemble._forest", "RandomForestClassifier"]]
        assert queued.signature == {} and queued.pickled_sklearn_version is None
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes("deployments"))


# ------------------------------------------------------------------ the validate stage, with a hostile probe


@pytest.fixture
def probe_says(user, make_deployment, monkeypatch, tmp_path):
    """A deployment through inspect and environment whose probe, in the real sandbox, prints `report`."""
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)

    def make(report: dict):
        deployment = make_deployment(user)
        stages.inspect(deployment)
        stages.environment(deployment)
        probe = tmp_path / "probe.py"
        probe.write_text(f"import sys\nsys.stdout.write({json.dumps(json.dumps(report))})\n")
        monkeypatch.setattr(buildkit, "PROBE", probe)
        return deployment

    return make


@pytest.mark.django_db
def test_validate_refuses_a_probe_report_of_the_wrong_type_and_stores_nothing_of_it(probe_says):
    deployment = probe_says(report(n_features_in="4; DROP TABLE"))
    with pytest.raises(StageError, match="cannot accept.*n_features_in"):
        stages.validate(deployment)
    deployment.refresh_from_db()
    assert deployment.signature == {} and deployment.example_request is None


@pytest.mark.django_db
def test_validate_keeps_only_the_keys_it_knows_from_the_probe(probe_says):
    deployment = probe_says(report(allowed_globals=[["os", "system"]], model_type_html="<b>"))
    assert stages.validate(deployment).startswith("RandomForestClassifier loaded with scikit-learn 1.5.2")
    deployment.refresh_from_db()
    assert deployment.signature == {**REPORT["signature"], "example_outputs": REPORT["outputs"]}
    assert deployment.example_response == {"prediction": 0, "model_type": "RandomForestClassifier"}
