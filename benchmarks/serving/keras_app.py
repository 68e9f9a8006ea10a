"""The FastAPI + Keras baseline of the serving benchmark: one process, the Keras model in memory.

POST /predict with the raw float32 bytes of one or more S x S images; answers their probabilities.
Run by run.py as ``uvicorn keras_app:app`` with MEDOPS_BENCH_KERAS pointing at a .keras file.
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, Request

app = FastAPI()
_state: dict = {}


@app.on_event("startup")
def load_model() -> None:
    import keras

    model = keras.models.load_model(os.environ["MEDOPS_BENCH_KERAS"], compile=False)
    size = int(model.input_shape[1])
    model(np.zeros((1, size, size, 1), np.float32), training=False)  # build and warm up
    _state.update(model=model, size=size)


@app.get("/health")
def health() -> dict:
    return {"ready": "model" in _state}


@app.post("/predict")
async def predict(request: Request) -> dict:
    size = _state["size"]
    x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, size, size, 1)
    # model(x) rather than model.predict(x): predict builds a tf.data pipeline per call.
    probs = np.asarray(_state["model"](x, training=False)).reshape(-1)
    return {"probability": probs.tolist()}
