"""explain: Grad-CAM heatmaps of a model trained on the bundled PneumoniaMNIST, and their PNGs."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.metrics import roc_auc_score

from _ingested import build_ingested
from medops.stages import explain
from medops.stages import split as split_stage
from medops.config import EvaluateConfig, SplitConfig, TrainConfig
from medops.errors import MedopsError
from medops.models import build_model
from medops.data import load_split_images


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Ingested folder, split.csv and a small simple_cnn fitted for a few epochs on its train rows."""
    root = tmp_path_factory.mktemp("explain")
    ingested = build_ingested(root / "ingested", n_per_split={"train": 400, "val": 60, "test": 90})
    split_csv = root / "split.csv"
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=split_csv)
    x, y, _ = load_split_images(ingested, split_csv, "train")
    keras.utils.set_random_seed(3)
    model = build_model("simple_cnn", TrainConfig(filters=[8, 16, 32], dense_units=32, dropout=0.0), x.shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0, shuffle=True)
    path = root / "model.keras"
    model.save(path)
    x_test, y_test, rows = load_split_images(ingested, split_csv, "test")
    return {"root": root, "ingested": ingested, "split": split_csv, "model_path": path, "model": model,
            "x_test": x_test, "y_test": y_test, "rows": rows}


def reference_grad_cam(model, images, layer_name):
    """Textbook Grad-CAM (Keras' example): a second model exposing the conv output, gradient of
    the probability. Independent of explain.py's call interception and logit."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        features, prob = grad_model(x, training=False)
        score = tf.reduce_sum(prob)
    grads = tape.gradient(score, features)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * features, axis=-1))
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
    return cam / cam.max(axis=(1, 2), keepdims=True)


def test_model_is_trained(project):
    scores = project["model"].predict(project["x_test"], verbose=0)[:, 0]
    assert roc_auc_score(project["y_test"], scores) > 0.8


def test_heatmaps_have_image_shape_range_and_structure(project):
    x = project["x_test"][:16]
    maps, probs = explain.grad_cam(project["model"], x, return_probabilities=True)
    assert maps.shape == (16, 28, 28) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    np.testing.assert_allclose(probs, project["model"].predict(x, verbose=0)[:, 0], atol=1e-5)
    # Every map is normalised to a peak of 1 and is not flat: it points somewhere.
    assert np.allclose(maps.max(axis=(1, 2)), 1.0)
    assert (maps.std(axis=(1, 2)) > 0.05).all()
    assert (maps.min(axis=(1, 2)) < 0.5).all()


def test_matches_textbook_grad_cam(project):
    x = project["x_test"][:12]
    ours = explain.grad_cam(project["model"], x, target="positive")
    ref = reference_grad_cam(project["model"], x, "conv3")
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_predicted_target_flips_the_score_for_negative_calls(project):
    x = project["x_test"]
    positive, probs = explain.grad_cam(project["model"], x, target="positive", return_probabilities=True)
    predicted = explain.grad_cam(project["model"], x, target="predicted", threshold=0.5)
    pos, neg = probs >= 0.5, probs < 0.5
    assert pos.any() and neg.any()
    np.testing.assert_allclose(predicted[pos], positive[pos], atol=1e-6)
    # For negative calls the map explains the evidence against pneumonia: another map.
    assert all(not np.allclose(predicted[i], positive[i], atol=0.05) for i in np.nonzero(neg)[0])


def test_heatmap_is_a_function_of_the_image(project):
    model = project["model"]
    img = project["x_test"][:1]
    again = explain.grad_cam(model, np.concatenate([img, img]))
    np.testing.assert_array_equal(again[0], again[1])
    changed = img.copy()
    changed[0, 2:10, 2:10, 0] = 1.0  # a bright patch in one corner
    mirrored = img[:, :, ::-1].copy()
    maps = explain.grad_cam(model, np.concatenate([img, changed, mirrored]))
    assert np.abs(maps[1] - maps[0]).max() > 0.1
    assert np.abs(maps[2] - maps[0]).max() > 0.1
    # A batch computes each image on its own: batching does not change a map.
    np.testing.assert_allclose(explain.grad_cam(model, changed)[0], maps[1], atol=1e-5)
    np.testing.assert_allclose(explain.grad_cam(model, project["x_test"][:5], batch_size=2),
                               explain.grad_cam(model, project["x_test"][:5]), atol=1e-5)


def test_the_model_is_left_as_it_was(project):
    model = project["model"]
    explain.grad_cam(model, project["x_test"][:2])
    assert all("call" not in vars(layer) for layer in model.layers)
    np.testing.assert_allclose(model(project["x_test"][:4]).numpy(),
                               model.predict(project["x_test"][:4], verbose=0), atol=1e-6)


def test_layer_by_name_and_errors(project):
    model = project["model"]
    assert explain.find_layer(model)[0] == "conv3"
    assert explain.find_layer(model, "conv2")[0] == "conv2"
    maps2 = explain.grad_cam(model, project["x_test"][:3], layer="conv2")
    maps3 = explain.grad_cam(model, project["x_test"][:3])
    assert maps2.shape == maps3.shape and not np.allclose(maps2, maps3)
    with pytest.raises(MedopsError, match="'nope' not found"):
        explain.grad_cam(model, project["x_test"][:1], layer="nope")
    with pytest.raises(MedopsError, match="not \\(n, h, w, c\\)"):
        explain.grad_cam(model, project["x_test"][:1], layer="dense")
    inputs = keras.Input((28, 28, 1), name="image")
    flat = keras.layers.Flatten()(inputs)
    dense_only = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(flat))
    with pytest.raises(MedopsError, match="no Conv2D layer"):
        explain.grad_cam(dense_only, project["x_test"][:1])
    with pytest.raises(ValueError, match="images must be"):
        explain.grad_cam(model, np.zeros((0, 28, 28, 1), np.float32))


def test_conv_layer_inside_a_nested_model(project):
    # As efficientnet_b0: the conv layers live in a backbone model called by the outer one.
    keras.utils.set_random_seed(5)
    inner_in = keras.Input((28, 28, 1))
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inner_in)
    y = keras.layers.MaxPooling2D(2)(y)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(y)
    backbone = keras.Model(inner_in, y, name="backbone")
    inputs = keras.Input((28, 28, 1), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(pooled))
    assert explain.find_layer(model)[0] == "backbone/c2"
    x = project["x_test"][:4]
    ours = explain.grad_cam(model, x, target="positive")
    # Reference by hand: features from the backbone, the head applied to them explicitly.
    with tf.GradientTape() as tape:
        features = backbone(tf.constant(x))
        tape.watch(features)
        head = model.get_layer("probability")
        score = tf.reduce_sum(tf.matmul(tf.reduce_mean(features, axis=(1, 2)), head.kernel) + head.bias)
    grads = tape.gradient(score, features)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * features, axis=-1))
    cam = tf.image.resize(cam[..., None], (28, 28))[..., 0].numpy()
    ref = np.divide(cam, cam.max(axis=(1, 2), keepdims=True), out=np.zeros_like(cam),
                    where=cam.max(axis=(1, 2), keepdims=True) > 0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.slow
def test_efficientnet_skips_its_1x1_convolutions(project):
    model = build_model("efficientnet_b0", TrainConfig(), (28, 28, 1))
    path, layer = explain.find_layer(model)
    assert path.startswith("efficientnetb0/") and layer.output.shape[1] == 2
    maps = explain.grad_cam(model, project["x_test"][:2])
    assert maps.shape == (2, 28, 28) and (maps.std(axis=(1, 2)) > 0.01).all()


def test_select_samples_by_hand():
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    probs = np.array([0.9, 0.6, 0.1, 0.45, 0.2, 0.8, 0.99, 0.7])
    # TP: 6 (0.99), 0 (0.9), 1 (0.6); TN: 2, 3; FP: 5 (0.8), 7 (0.7); FN: 4
    assert list(explain.classify_outcomes(labels, probs, 0.5)) == ["TP", "TP", "TN", "TN", "FN", "FP", "TP", "FP"]
    assert explain.select_samples(labels, probs, 0.5, 6) == [6, 2, 5, 4, 0, 3]
    assert explain.select_samples(labels, probs, 0.5, 100) == [6, 2, 5, 4, 0, 3, 7, 1]
    assert explain.select_samples(labels, probs, 0.5, 0) == []


def test_pngs_are_valid_and_named_by_pseudonymous_uid(project, tmp_path):
    rows = project["rows"].iloc[:5].copy()
    rows["sop_instance_uid"] = ["2.25.1", "2.25.2", "2.25.3", "2.25.4/../x", "2.25.5"]
    files = explain.save_gradcam_pngs(project["model"], project["x_test"][:5], tmp_path / "png", meta=rows, limit=4)
    assert [f.name for f in files] == ["gradcam-00-2.25.1.png", "gradcam-01-2.25.2.png", "gradcam-02-2.25.3.png",
                                       "gradcam-03-2.25.4_.._x.png"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f.name for f in files]
    for f in files:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (640, 360)
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10  # a drawn figure, not a blank canvas
    unnamed = explain.save_gradcam_pngs(project["model"], project["x_test"][:2], tmp_path / "anon")
    assert [f.name for f in unnamed] == ["gradcam-00.png", "gradcam-01.png"]


def test_run_writes_a_sample_of_the_test_split(project, tmp_path):
    out = project["root"] / "plots" / "gradcam"
    out.mkdir(parents=True)
    (out / "gradcam-99-stale.png").write_bytes(b"old")
    (out / "keep.txt").write_text("not ours")
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps({"decision_threshold": 0.4}))
    result = explain.run(EvaluateConfig(), model=project["model_path"], ingested_dir=project["ingested"],
                         split=project["split"], out_dir=out, train_result=train_json)
    assert result.threshold == 0.4 and result.threshold_source == "train"
    assert result.layer == "conv3" and result.n_test == len(project["x_test"])
    assert len(result.files) == len(result.samples) == 8
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f.split("/")[-1] for f in result.files), "keep.txt"])
    test_uids = set(pd.read_csv(project["split"]).query("split == 'test'")["sop_instance_uid"])
    scores = dict(zip(project["rows"]["sop_instance_uid"],
                      project["model"].predict(project["x_test"], verbose=0)[:, 0]))
    for s in result.samples:
        assert s.sop_instance_uid in test_uids and s.sop_instance_uid in s.file
        assert s.probability == pytest.approx(float(scores[s.sop_instance_uid]), abs=1e-5)
        expected = ("TP" if s.label else "FP") if s.probability >= 0.4 else ("FN" if s.label else "TN")
        assert s.outcome == expected
        with Image.open(s.file) as im:
            assert im.format == "PNG"
    # The sample is select_samples' choice (round-robin over outcomes, most confident first).
    uids = project["rows"]["sop_instance_uid"].to_numpy()
    chosen = explain.select_samples(project["y_test"], np.array([scores[u] for u in uids]), 0.4, 8)
    assert [s.sop_instance_uid for s in result.samples] == list(uids[chosen])
    assert len({s.outcome for s in result.samples}) >= 2
    assert json.loads(result.model_dump_json())["files"] == result.files


def test_import_does_not_load_tensorflow():
    code = "import sys, medops.stages.explain, medops.learn.preview; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
