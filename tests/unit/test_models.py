"""models: the registry, and the input/output names and shapes the serving contract relies on."""

from __future__ import annotations

import numpy as np
import pytest

from medops.config import TrainConfig
from medops.errors import ConfigError
from medops.models import INPUT_NAME, MODELS, OUTPUT_NAME, build_model


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "efficientnet_b0" else n for n in sorted(MODELS)]
)
def test_every_registered_model_has_the_contract_names_and_shapes(name):
    cfg = TrainConfig(model=name, filters=[8, 16, 32], dense_units=16)
    model = build_model(name, cfg, (28, 28, 1))
    assert model.inputs[0].name == INPUT_NAME == "image"
    assert tuple(model.inputs[0].shape) == (None, 28, 28, 1)
    assert model.get_layer(OUTPUT_NAME).name == "probability"
    assert model.output_names == ["probability"]
    out = model.predict(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32), verbose=0)
    assert out.shape == (3, 1)
    assert ((out > 0) & (out < 1)).all()


def test_simple_cnn_follows_its_config():
    model = build_model("simple_cnn", TrainConfig(filters=[4, 8, 16], dense_units=10, dropout=0.25), (28, 28, 1))
    convs = [layer for layer in model.layers if layer.name.startswith("conv")]
    assert [c.filters for c in convs] == [4, 8, 16]
    assert len([layer for layer in model.layers if layer.name.startswith("pool")]) == 3
    assert model.get_layer("dense").units == 10
    assert model.get_layer("dropout").rate == 0.25


def test_resnet_efficientnet_and_vit_follow_their_config():
    cfg = TrainConfig(filters=[8, 16, 24], dropout=0.2)
    resnet = build_model("resnet", cfg, (28, 28, 1))
    assert [resnet.get_layer(f"s{i}b1_conv1").filters for i in (1, 2, 3)] == [8, 16, 24]
    assert resnet.get_layer("s3b2_out").output.shape[1:] == (7, 7, 24)  # two stride-2 stages
    eff = build_model("efficientnet_b0", cfg, (28, 28, 1))
    assert eff.get_layer("upsample").output.shape[1:] == (32, 32, 1)  # EfficientNet needs >= 32 px
    assert build_model("efficientnet_b0", cfg, (64, 64, 1)).inputs[0].shape[1:] == (64, 64, 1)
    vit = build_model("vit", cfg, (28, 28, 1))
    assert vit.get_layer("tokens").output.shape[1:] == (49, 24)  # a 7x7 grid of dim-24 tokens
    assert len([layer for layer in vit.layers if layer.name.endswith("_mha")]) == 3


def test_unknown_model_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown model 'vgg99'.*simple_cnn"):
        build_model("vgg99", TrainConfig(), (28, 28, 1))


def test_non_square_or_colour_input_is_rejected():
    with pytest.raises(ConfigError, match=r"\(S, S, 1\)"):
        build_model("simple_cnn", TrainConfig(), (28, 28, 3))
