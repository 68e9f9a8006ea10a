"""ensemble: several trained classifiers served as one model, the mean of their logits.

A member is a medops classifier whose last layer is ``probability`` = Dense(1, sigmoid) (with its
own Platt calibration folded in, ``medops.learn.calibration``). The ensemble is again such a
model: one input ``image``, every member's penultimate features concatenated, and a new
``probability`` layer whose kernel is [W_1; ...; W_K] / K and bias mean(b_k), so its logit is
exactly the mean of the members' logits, z = (1/K) sum_k z_k (up to float32 rounding).

Everything that reads a medops model then works on the ensemble unchanged: ``fold_calibration``
(the ensemble is recalibrated on val like a single model), ``model_logits``, the OOD guard's
features (the concatenated features; ``medops.learn.ood.feature_model``), evaluate, and export,
which converts it to ONE ONNX graph with the usual contract (parity-checked against Keras).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medops.errors import MedopsError
from medops.learn.calibration import output_layer
from medops.models import INPUT_NAME, OUTPUT_NAME


def combine_members(members: Sequence[Any], *, name: str = "ensemble") -> Any:
    """One Keras model whose output is sigmoid of the mean of ``members``' logits (see the module
    docstring). The members' weights are shared, not copied; save the result to keep it.

    Raises:
        MedopsError: fewer than two members, members with different input shapes, or a member
            without a Dense(1, sigmoid) ``probability`` layer.
    """
    import keras

    if len(members) < 2:
        raise MedopsError(f"an ensemble needs at least two members, got {len(members)}")
    shapes = {tuple(m.inputs[0].shape[1:]) for m in members}
    if len(shapes) != 1:
        raise MedopsError(f"ensemble members take different inputs: {sorted(shapes)}")
    image = keras.Input(shape=shapes.pop(), name=INPUT_NAME)
    features, kernels, biases = [], [], []
    for i, member in enumerate(members):
        layer = output_layer(member)
        cut = keras.Model(member.inputs, layer.input, name=f"member_{i}")
        features.append(cut(image))
        kernel, bias = layer.get_weights()
        kernels.append(np.asarray(kernel, dtype=np.float64))
        biases.append(np.asarray(bias, dtype=np.float64))
    joined = keras.layers.Concatenate(name="member_features")(features)
    head = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME, dtype="float32")
    model = keras.Model(image, head(joined), name=name)
    head.set_weights([(np.concatenate(kernels) / len(members)).astype(np.float32),
                      np.mean(biases, axis=0).astype(np.float32)])
    return model
