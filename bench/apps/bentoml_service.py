"""The BentoML peer: services around the same pickle.

`bentoml serve bentoml_service:Classifier` takes ServeML's JSON contract, one request at a time.
`bentoml serve bentoml_service:BatchedClassifier` is BentoML at its best for many small requests:
a batchable API (adaptive batching, as BentoML's guide configures it), which takes one array.
"""

import os
import pickle

import bentoml
import numpy as np


def load_model():
    with open(os.environ["MODEL_PATH"], "rb") as handle:
        return pickle.load(handle)


@bentoml.service(workers=2)
class Classifier:
    def __init__(self):
        self.model = load_model()

    @bentoml.api
    def predict(self, data: list[float] | None = None, instances: list[list[float]] | None = None) -> dict:
        if data is not None:
            return {"prediction": self.model.predict(np.asarray([data]))[0].item()}
        return {"predictions": self.model.predict(np.asarray(instances)).tolist()}


@bentoml.service(workers=2)
class BatchedClassifier:
    def __init__(self):
        self.model = load_model()

    # A batchable API takes a single parameter: {"instances": [[...], ...]}, one row or many.
    # Requests that wait together are stacked along axis 0 (batch_dim) into one predict, and the
    # answer is split back. max_batch_size counts rows: 100 lets a 100-row request through whole.
    # max_latency_ms as in BentoML's guide: past it a request is refused with a 503, which the
    # bench counts as an error, rather than the 60 s default hiding an overload as slow answers.
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=100, max_latency_ms=1000)
    def predict(self, instances: np.ndarray) -> np.ndarray:
        return self.model.predict(instances)
