"""The BentoML peer: a service around the same pickle (bentoml serve bentoml_service:Classifier)."""

import os
import pickle

import bentoml
import numpy as np


@bentoml.service(workers=2)
class Classifier:
    def __init__(self):
        with open(os.environ["MODEL_PATH"], "rb") as handle:
            self.model = pickle.load(handle)

    @bentoml.api
    def predict(self, data: list[float] | None = None, instances: list[list[float]] | None = None) -> dict:
        if data is not None:
            return {"prediction": self.model.predict(np.asarray([data]))[0].item()}
        return {"predictions": self.model.predict(np.asarray(instances)).tolist()}
