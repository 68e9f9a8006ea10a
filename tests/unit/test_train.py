"""train: a short seeded run on real images learns something and records what it did."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from _ingested import build_trained
from medops.stages import train as train_stage
from medops.config import AugmentConfig, TrainConfig
from medops.data import load_split_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained(tmp_path_factory.mktemp("train"), epochs=3)


@pytest.mark.slow
def test_training_beats_chance_on_val(trained):
    model = keras.saving.load_model(trained["model"], compile=False)
    x_val, y_val, _ = load_split_images(trained["ingested"], trained["split"], "val")
    auc = roc_auc_score(y_val, model.predict(x_val, verbose=0)[:, 0])
    assert auc > 0.8, f"val AUC {auc:.3f} after 3 epochs on 600 images"


@pytest.mark.slow
def test_train_result_records_params_history_and_data_version(trained):
    record = json.loads(trained["train_result"].read_text())
    assert record["data_version"] == "test-data-version"
    assert record["n_train"] == 600 and record["n_val"] == 160
    assert record["input_size"] == 28
    assert record["epochs_run"] == 3
    assert set(record["history"]) >= {"loss", "auc", "val_loss", "val_auc"}
    assert all(len(v) == 3 for v in record["history"].values())
    assert record["params"]["train"]["filters"] == [16, 32, 64]
    assert record["params"]["augment"] == AugmentConfig().model_dump(mode="json")
    assert record["duration_s"] > 0
    assert record["val_auc"] == record["history"]["val_auc"][-1]


@pytest.mark.slow
def test_best_epoch_weights_and_val_threshold_are_kept(trained):
    record = json.loads(trained["train_result"].read_text())
    val_auc = record["history"]["val_auc"]
    assert record["best_epoch"] == int(np.argmax(val_auc)) + 1
    # Keras' val_auc is a 200-bin approximation; the exact AUC of the kept weights is close to it.
    assert record["best_val_auc"] == pytest.approx(max(val_auc), abs=0.01)
    assert record["threshold_strategy"] == "youden"
    model = keras.saving.load_model(trained["model"], compile=False)
    x_val, y_val, _ = load_split_images(trained["ingested"], trained["split"], "val")
    from medops.metrics import select_threshold

    scores = model.predict(x_val, verbose=0)[:, 0]
    assert record["decision_threshold"] == pytest.approx(select_threshold(y_val, scores, "youden"), abs=1e-5)


def test_balanced_class_weights_by_hand():
    labels = np.array([1, 1, 1, 0])
    assert train_stage.compute_class_weights(labels, "balanced") == {0: 2.0, 1: pytest.approx(4 / 6)}
    assert train_stage.compute_class_weights(labels, "none") is None


@pytest.mark.slow
def test_training_is_seeded_and_never_reads_test(trained, tmp_path):
    # Drop the test rows from the metadata: training must not notice.
    meta = pd.read_parquet(trained["ingested"] / "metadata.parquet")
    split = pd.read_csv(trained["split"])
    test_uids = set(split.loc[split["split"] == "test", "sop_instance_uid"])
    ingested = tmp_path / "ingested"
    (ingested / "arrays").mkdir(parents=True)
    for shard in (trained["ingested"] / "arrays").iterdir():
        (ingested / "arrays" / shard.name).write_bytes(shard.read_bytes())
    meta[~meta["sop_instance_uid"].isin(test_uids)].to_parquet(ingested / "metadata.parquet")
    split_no_test = tmp_path / "split.csv"
    split[split["split"] != "test"].to_csv(split_no_test, index=False)

    cfg = TrainConfig(epochs=1, batch_size=32, filters=[8, 16, 32], dense_units=16, seed=5)
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        result = train_stage.run(
            cfg.model_copy(update={"seed": seed}), AugmentConfig(), ingested_dir=ingested,
            split=split_no_test, model_out=tmp_path / f"m{i}.keras", result_out=tmp_path / f"t{i}.json",
            data_version="v",
        )
        runs.append(result)
    weights = [keras.saving.load_model(tmp_path / f"m{i}.keras").get_weights() for i in range(3)]
    # Same seed: the same model (to float rounding); another seed: a different one.
    same = max(float(np.abs(a - b).max()) for a, b in zip(weights[0], weights[1]))
    other = max(float(np.abs(a - b).max()) for a, b in zip(weights[0], weights[2]))
    assert same < 1e-5 and other > 1e-3
    assert runs[0].history["loss"] == pytest.approx(runs[1].history["loss"], rel=1e-3)


def test_a_one_class_training_split_is_refused(tmp_path):
    from _ingested import build_ingested
    from medops.stages import split as split_stage
    from medops.config import SplitConfig
    from medops.errors import MedopsError

    ingested = build_ingested(tmp_path / "ingested", n_per_split={"train": 30, "val": 30, "test": 30})
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=tmp_path / "split.csv")
    table = pd.read_csv(tmp_path / "split.csv")
    table = table[(table["split"] != "train") | (table["label"] == 1)]
    table.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(MedopsError, match=r"the train split has only label\(s\) \[1\]"):
        train_stage.run(
            TrainConfig(epochs=1), AugmentConfig(), ingested_dir=ingested, split=tmp_path / "split.csv",
            model_out=tmp_path / "m.keras", result_out=tmp_path / "t.json", data_version="v",
        )
    assert not (tmp_path / "m.keras").exists()


def test_cosine_schedule_decays_the_learning_rate_over_the_run():
    from medops.models import build_model

    cfg = TrainConfig(lr_schedule="cosine", epochs=4, learning_rate=1e-2, filters=[4], dense_units=4)
    optimizer = train_stage.compile_model(build_model("simple_cnn", cfg, (28, 28, 1)), cfg,
                                          steps_per_epoch=5).optimizer
    rates = {}
    for step in (0, 10, 20):  # the run is epochs * steps_per_epoch = 20 steps
        optimizer.iterations.assign(step)
        rates[step] = float(optimizer.learning_rate)
    assert rates[0] == pytest.approx(1e-2)
    assert rates[0] > rates[10] > rates[20]
    assert rates[20] == pytest.approx(1e-2 * 0.01, rel=1e-3)  # alpha: 1 % of the initial rate left
    constant = train_stage.compile_model(build_model("simple_cnn", cfg, (28, 28, 1)),
                                         cfg.model_copy(update={"lr_schedule": "constant"}),
                                         steps_per_epoch=5).optimizer
    constant.iterations.assign(20)
    assert float(constant.learning_rate) == pytest.approx(1e-2)


def test_fit_model_passes_class_weights_early_stopping_and_the_schedule_to_fit(monkeypatch):
    import medops.learn.distribute
    from medops.learn.distribute import plan_distribution

    seen = {}

    def fake_fit(plan, build_model_fn, dataset_fn, **kwargs):
        seen.update(kwargs, model=build_model_fn())
        return medops.learn.distribute.FitOutcome(model=seen["model"], history={"loss": [1.0]}, plan=plan)

    monkeypatch.setattr(medops.learn.distribute, "fit_under_plan", fake_fit)
    rng = np.random.default_rng(0)
    x = rng.random((40, 28, 28, 1)).astype(np.float32)
    y = np.array([1] * 30 + [0] * 10, dtype=np.float32)
    cfg = TrainConfig(class_weight="balanced", early_stopping_patience=2, lr_schedule="cosine", epochs=3,
                      batch_size=8, filters=[4], dense_units=4)
    train_stage.fit_model(cfg, AugmentConfig(), (x, y), (x, y), plan=plan_distribution(env={}, gpus=[]))
    assert seen["class_weight"] == train_stage.compute_class_weights(y, "balanced") == {
        0: pytest.approx(2.0), 1: pytest.approx(40 / 60)}
    [stopper] = [c for c in seen["callbacks"] if isinstance(c, keras.callbacks.EarlyStopping)]
    assert stopper.patience == 2 and stopper.restore_best_weights
    compiled = seen["compile_fn"](seen["model"])
    compiled.optimizer.iterations.assign(3 * 5)  # epochs * ceil(40 / 8) steps: the end of the run
    assert float(compiled.optimizer.learning_rate) == pytest.approx(cfg.learning_rate * 0.01, rel=1e-3)


@pytest.mark.slow
def test_training_options_early_stopping_class_weights_cosine_tensorboard(trained, tmp_path):
    cfg = TrainConfig(epochs=12, batch_size=64, filters=[8, 16, 32], dense_units=16, learning_rate=3e-3,
                      class_weight="balanced", early_stopping_patience=1, lr_schedule="cosine",
                      threshold_strategy="sensitivity", target_sensitivity=0.95)
    result = train_stage.run(
        cfg, AugmentConfig(), ingested_dir=trained["ingested"], split=trained["split"],
        model_out=tmp_path / "m.keras", result_out=tmp_path / "t.json", data_version="v",
        log_dir=tmp_path / "tb",
    )
    assert result.epochs_run < 12  # patience 1 stops well before 12 epochs
    assert result.best_epoch == result.epochs_run - 1
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["params"]["train"] == cfg.model_dump(mode="json")
    assert record["threshold_strategy"] == "sensitivity"
    x_val, y_val, _ = load_split_images(trained["ingested"], trained["split"], "val")
    scores = keras.saving.load_model(tmp_path / "m.keras", compile=False).predict(x_val, verbose=0)[:, 0]
    assert ((scores >= result.decision_threshold)[y_val == 1]).mean() >= 0.95
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


# minutes on 2 cores (two more trainings); test_models builds both, make test-long trains them
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_other_architectures_go_through_the_same_train_path(trained, tmp_path, name):
    cfg = TrainConfig(model=name, epochs=1, batch_size=64, filters=[8, 16, 16], dense_units=16)
    result = train_stage.run(
        cfg, AugmentConfig(), ingested_dir=trained["ingested"], split=trained["split"],
        model_out=tmp_path / "m.keras", result_out=tmp_path / "t.json", data_version="v",
    )
    assert result.model == name and result.epochs_run == 1
    model = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert model.name == name and model.output_names == ["probability"]


@pytest.mark.slow
def test_a_training_run_saves_its_augmentation_preview_and_provenance(trained):
    from PIL import Image

    from medops.stages.train import preview_path

    png = preview_path(trained["model"])
    assert png.is_file()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    record = json.loads(trained["train_result"].read_text())
    assert record["distribution"]["strategy"] == "default"  # no GPU, no TF_CONFIG here
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", record["code_commit"])  # this is a git checkout


def test_training_order_does_not_depend_on_the_order_split_csv_lists_images():
    # split.csv's order follows pseudonyms (key-dependent); two listings of the same images in
    # different orders must reach the model in one order, that of the source content hashes
    import pandas as pd

    from medops.stages.train import canonical_order

    rng = np.random.default_rng(0)
    hashes = np.array([f"{h:064x}" for h in rng.integers(0, 2**62, 20)])
    x = rng.random((20, 4, 4, 1)).astype(np.float32)
    y = (rng.random(20) > 0.5).astype(np.float32)
    first = canonical_order(x, y, pd.DataFrame({"content_sha256": hashes}))
    perm = rng.permutation(20)
    second = canonical_order(x[perm], y[perm], pd.DataFrame({"content_sha256": hashes[perm]}))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], x[np.argsort(hashes)])
