"""Baseline (c) of the serving benchmark: the usual hand-made model server.

FastAPI + uvicorn, one worker, the Keras model loaded once and ``model.predict`` called per
request, as tutorials write it. POST /predict with the raw float32 bytes of one or more S x S
images; answers their probabilities. Run by run.py as ``uvicorn keras_app:app`` with
MEDOPS_BENCH_KERAS pointing at a .keras file.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request

_state: dict = {}


@asynccontextmanager
async def lifespan(_: FastAPI):
    import keras

    model = keras.models.load_model(os.environ["MEDOPS_BENCH_KERAS"], compile=False)
    size = int(model.input_shape[1])
    model.predict(np.zeros((1, size, size, 1), np.float32), verbose=0)  # build and warm up
    _state.update(model=model, size=size)
    yield
    _state.clear()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
def health() -> dict:
    return {"ready": "model" in _state}


@app.post("/predict")
async def predict(request: Request) -> dict:
    size = _state["size"]
    x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, size, size, 1)
    # The hand-made pattern: predict in the handler. It blocks the event loop while it runs, so
    # requests are served one at a time, each as its own batch.
    probs = _state["model"].predict(x, verbose=0).reshape(-1)
    return {"probability": probs.tolist()}
