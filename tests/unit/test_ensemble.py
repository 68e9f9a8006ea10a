"""A seed ensemble served as one model (medops.learn.ensemble, train.ensemble_seeds), on real
PneumoniaMNIST images: its output is the mean of the members' logits, it calibrates, saves and
exports to one ONNX graph like a single model, and a member trained inside the ensemble is the
model the same seed trains alone (so benchmarks/quality/seeds.py may combine seeds trained apart)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medops.errors import MedopsError

from medops.paths import BUNDLED_DATASET as DATASET  # the copy the project ships

# four small trainings, about 2 min: the seed ensemble is make quality's recipe, not the default
# pipeline's (train.ensemble_seeds: []), so these run in make test-long


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    raw = np.load(DATASET)  # sorted by label: a seeded sample of each split has both classes

    def pick(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.sort(np.random.default_rng(0).permutation(len(raw[f"{split}_labels"]))[:n])
        return ((raw[f"{split}_images"][idx].astype("float32") / 255.0)[..., None],
                raw[f"{split}_labels"][idx, 0].astype("float32"))

    (x, y), (xv, yv), (xt, yt) = pick("train", 1024), pick("val", 200), pick("test", 200)
    return {"x": x, "y": y, "xv": xv, "yv": yv, "xt": xt, "yt": yt}


def small_cfg(**update):
    from medops.config import TrainConfig

    return TrainConfig(model="simple_cnn", epochs=3, batch_size=64, learning_rate=0.003, filters=[16, 32], dense_units=32,
                       calibration="platt", threshold_strategy="balanced", class_weight="balanced",
                       **update)


@pytest.fixture(scope="module")
def trained(data):
    """Seeds 1 and 2 each trained alone and calibrated on val, and the two trained as one
    ensemble (``train.ensemble_seeds: [1, 2]``)."""
    from medops.config import AugmentConfig
    from medops.stages.train import choose_decision, fit_model, fit_recipe

    train, val = (data["x"], data["y"]), (data["xv"], data["yv"])
    alone = []
    for seed in (1, 2):
        model, *_ = fit_model(small_cfg(seed=seed), AugmentConfig(), train, val)
        choose_decision(model, small_cfg(seed=seed), *val)
        alone.append(model)
    ensemble, _, best, members = fit_recipe(small_cfg(ensemble_seeds=[1, 2]), AugmentConfig(), train, val)
    return alone, ensemble, best, members


@pytest.mark.slow
@pytest.mark.long
def test_the_ensemble_outputs_the_mean_of_its_members_logits(trained, data, tmp_path):
    from medops.learn.calibration import fold_calibration, model_logits
    from medops.learn.ensemble import combine_members
    from medops.learn.inference import load_model, predict_probabilities
    from medops.metrics import compute_auc, sigmoid

    alone = trained[0]
    ensemble = combine_members(alone)
    z = model_logits(ensemble, data["xt"])
    member_z = [model_logits(m, data["xt"]) for m in alone]
    assert not np.allclose(member_z[0], member_z[1], atol=1e-3)  # two different models
    assert np.allclose(z, np.mean(member_z, axis=0), atol=1e-5)
    assert compute_auc(data["yt"], z) > 0.75  # trained members, real test images
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    assert np.array_equal(predict_probabilities(load_model(path), data["xt"]),
                          predict_probabilities(ensemble, data["xt"]))
    fold_calibration(ensemble, 0.5, -0.3)  # recalibrated on val like one model
    assert np.allclose(predict_probabilities(ensemble, data["xt"]), sigmoid(0.5 * z - 0.3), atol=1e-5)
    assert np.allclose(model_logits(alone[0], data["xt"]), member_z[0])  # members untouched


@pytest.mark.slow
@pytest.mark.long
def test_members_trained_in_the_ensemble_are_the_seeds_trained_alone(trained, data):
    """What train.ensemble_seeds trains in one run is what seeds.py combines from seeds run apart."""
    from medops.learn.calibration import model_logits
    from medops.learn.ensemble import combine_members

    alone, ensemble, best, members = trained
    assert [m["seed"] for m in members] == [1, 2] and best is None
    assert all(m["calibration"]["method"] == "platt" and 0 <= m["val_ece"] <= 1 for m in members)
    assert np.allclose(model_logits(ensemble, data["xv"]), model_logits(combine_members(alone), data["xv"]),
                       atol=1e-6)


@pytest.mark.slow
@pytest.mark.long
def test_the_ensemble_exports_to_one_onnx_graph_with_parity(trained, data):
    from medops.learn.ood import feature_model
    from medops.stages.export import check_parity, convert_to_onnx, run_onnx

    ensemble = trained[1]
    proto = convert_to_onnx(ensemble, 28, 17, {"data_version": "test"})
    keras_out = ensemble.predict(data["xt"], verbose=0)
    assert check_parity(keras_out, run_onnx(proto.SerializeToString(), data["xt"]), 1e-4) <= 1e-4
    # the OOD guard's features are both members' penultimate features side by side
    assert feature_model(ensemble).output.shape[-1] == 2 * 32  # dense_units 32 features each


@pytest.mark.slow
@pytest.mark.long
def test_combine_members_refuses_what_cannot_be_one_model(trained):
    import keras

    from medops.learn.ensemble import combine_members

    alone = trained[0][0]
    with pytest.raises(MedopsError, match="at least two"):
        combine_members([alone])
    inputs = keras.Input((14, 14, 1), name="image")
    other = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(
        keras.layers.Flatten()(inputs)))
    with pytest.raises(MedopsError, match="different inputs"):
        combine_members([alone, other])


def test_ensemble_seeds_must_be_two_or_more_distinct_seeds():
    from pydantic import ValidationError

    assert small_cfg(ensemble_seeds=[]).ensemble_seeds == []
    for bad in ([3], [1, 1]):
        with pytest.raises(ValidationError, match="ensemble_seeds"):
            small_cfg(ensemble_seeds=bad)


@pytest.mark.slow
@pytest.mark.long
def test_the_train_stage_serves_the_ensemble_and_combine_saved_rebuilds_it_from_seeds_run_apart(tmp_path):
    """``train.ensemble_seeds`` through the train stage (model.keras + train.json with the members),
    and ``combine_saved`` (seeds.py's path) from the same seeds trained in runs of their own."""
    from _ingested import build_ingested
    from medops.config import AugmentConfig, SplitConfig
    from medops.data import load_split_images
    from medops.learn.calibration import model_logits
    from medops.learn.inference import load_model
    from medops.stages import split as split_stage
    from medops.stages import train as train_stage

    ingested = build_ingested(tmp_path / "ingested", n_per_split={"train": 1024, "val": 200, "test": 40})
    split_csv = tmp_path / "split" / "split.csv"
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=split_csv)
    common = dict(ingested_dir=ingested, split=split_csv, data_version="v")

    def train(name: str, cfg) -> Path:
        train_stage.run(cfg, AugmentConfig(), model_out=tmp_path / name / "model.keras",
                        result_out=tmp_path / name / "train.json", **common)
        return tmp_path / name / "model.keras"

    served = train("ensemble", small_cfg(ensemble_seeds=[1, 2]))
    record = json.loads(served.with_name("train.json").read_text())
    assert [m["seed"] for m in record["members"]] == [1, 2] and record["calibration"]["method"] == "platt"
    assert record["decision_threshold"] == pytest.approx(record["val_positive_fraction"])  # balanced rule
    members = [train(f"seed-{seed}", small_cfg(seed=seed)) for seed in (1, 2)]
    result = train_stage.combine_saved(small_cfg(ensemble_seeds=[1, 2]), AugmentConfig(), members=members,
                                       model_out=tmp_path / "combined" / "model.keras",
                                       result_out=tmp_path / "combined" / "train.json", **common)
    assert [m["seed"] for m in result.members] == [1, 2] and result.epochs_run == 0
    x_val = load_split_images(ingested, split_csv, "val")[0]
    assert np.allclose(model_logits(load_model(tmp_path / "combined" / "model.keras"), x_val),
                       model_logits(load_model(served), x_val), atol=1e-5)
    assert result.calibration == pytest.approx(record["calibration"], abs=1e-6)


class Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.long
def test_an_interrupted_ensemble_run_resumes_at_its_member(trained, data, tmp_path, monkeypatch):
    """A run stopped while training member 2 keeps member 1 (backup_dir/seed-1) and trains only
    member 2 when run again; the same ensemble comes out, and the kept members are removed."""
    from medops.config import AugmentConfig
    from medops.learn.calibration import model_logits
    from medops.stages import train as train_stage

    real, calls = train_stage.fit_model, []

    def fit_model(cfg, *args, **kwargs):
        calls.append(cfg.seed)
        if calls == [1, 2]:
            raise Interrupted  # the run stops (killed, the machine goes down) during member 2
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(train_stage, "fit_model", fit_model)
    cfg, backup = small_cfg(ensemble_seeds=[1, 2]), tmp_path / "backup"
    train, val = (data["x"], data["y"]), (data["xv"], data["yv"])
    with pytest.raises(Interrupted):
        train_stage.fit_recipe(cfg, AugmentConfig(), train, val, backup_dir=backup)
    assert (backup / "seed-1" / "member.keras").is_file() and not (backup / "seed-2" / "member.json").exists()
    ensemble, _, _, members = train_stage.fit_recipe(cfg, AugmentConfig(), train, val, backup_dir=backup)
    assert calls == [1, 2, 2] and [m["seed"] for m in members] == [1, 2]
    assert members[0]["calibration"] == pytest.approx(trained[3][0]["calibration"])  # member 1 as trained
    assert np.allclose(model_logits(ensemble, data["xv"]), model_logits(trained[1], data["xv"]), atol=1e-6)
    assert not backup.exists()
