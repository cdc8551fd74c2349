"""The peer a user would write by hand: FastAPI + uvicorn around the pickle.

Run: MODEL_PATH=model.pkl uvicorn fastapi_app:app --workers 2
Same request and response JSON as ServeML, so the load is identical.
"""

import os
import pickle

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

with open(os.environ["MODEL_PATH"], "rb") as handle:
    model = pickle.load(handle)

app = FastAPI()


class Request(BaseModel):
    data: list[float] | None = None
    instances: list[list[float]] | None = None


@app.post("/predict")
def predict(request: Request):
    if request.data is not None:
        return {"prediction": model.predict(np.asarray([request.data]))[0].item(), "model_type": type(model).__name__}
    return {"predictions": model.predict(np.asarray(request.instances)).tolist(), "model_type": type(model).__name__}
