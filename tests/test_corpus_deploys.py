"""Every real model of the corpus deploys through the real pipeline and predicts
exactly like the model itself, in every format ServeML accepts."""

import httpx
import numpy as np
import pytest
import skops

from deployments import services
from deployments.allowlist import corpus
from deployments.models import Deployment
from tests.conftest import PANDAS_PIN, dump, upload, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REQUIREMENTS = f"{PANDAS_PIN}skops=={skops.__version__}\n"
FORMATS = {"pickle": ("pickle", 0), "joblib": ("joblib", 0), "joblib-zlib": ("joblib", 3), "skops": ("skops", 0)}


def request_and_expected(name, model):
    """A batch request in the prediction contract, and what the model itself answers."""
    if name in ("column_transformer",):
        frame = corpus.mixed_frame()[0].iloc[::7]
        return {"instances": frame.to_dict(orient="records")}, model.predict(frame)
    if name == "frame_random_forest":
        frame = corpus.iris_frame()[0].iloc[::15]
        return {"instances": frame.to_dict(orient="records")}, model.predict(frame)
    if name == "text_pipeline":
        texts = ["good film", "awful movie", "loved it"]
        return {"instances": texts}, model.predict(texts)
    X = corpus.iris()[0][::15]
    if name == "gradient_boosting_regressor":
        X = X[:, :3]
    return {"instances": X.tolist()}, model.predict(X)


def same(predictions, expected) -> bool:
    got = np.asarray(predictions)
    if expected.dtype.kind == "f":
        return np.allclose(got.astype(float), expected, rtol=1e-9)
    return np.array_equal(got, expected)


def test_every_corpus_model_deploys_and_predicts_in_every_format(stack, user):
    models = {name: factory() for name, factory in corpus.MODELS.items()}
    submitted = []
    for name, model in models.items():
        for label, (fmt, compress) in FORMATS.items():
            deployment = services.deployment_create(
                owner=user,
                name=f"{name}-{label}",
                target="local",
                model_format=fmt,
                model_upload=upload(dump(model, fmt, compress), f"model.{fmt}"),
                requirements_upload=upload(REQUIREMENTS.encode(), "requirements.txt"),
            )
            submitted.append((name, label, deployment))
    failures = []
    for name, label, deployment in submitted:

        def settled(deployment=deployment):
            deployment.refresh_from_db()
            return deployment.is_terminal()

        wait_for(settled, 300, f"{name} ({label}) deployed", stack.worker.log)
        if deployment.status != Deployment.Status.READY:
            failures.append(f"{name} ({label}): {deployment.error}")
            continue
        body, expected = request_and_expected(name, models[name])
        answer = httpx.post(deployment.endpoint_url, json=body, timeout=60)
        if answer.status_code != 200 or not same(answer.json()["predictions"], expected):
            failures.append(f"{name} ({label}): {answer.status_code} {answer.text[:200]}")
        services.deployment_stop(deployment=deployment)  # frees its model process for the next ones
    assert failures == []
    assert len(submitted) >= 44
