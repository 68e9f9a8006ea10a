"""split: patient-level, honours the manifest split, seeded, stratified, and fails loudly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _ingested import build_ingested
from medops import data
from medops.stages import split as split_stage
from medops.config import SplitConfig
from medops.errors import SplitError


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    return build_ingested(
        tmp_path_factory.mktemp("ingested"),
        n_per_split={"train": 240, "val": 60, "test": 60},
        images_per_patient=4,
        shard_size=100,
    )


def _meta(ingested):
    return pd.read_parquet(ingested / "metadata.parquet")


def test_manifest_split_is_honoured(ingested, tmp_path):
    out = tmp_path / "split" / "split.csv"
    result = split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=out)
    table = pd.read_csv(out)
    assert list(table.columns) == ["sop_instance_uid", "patient_id", "label", "split"]
    meta = _meta(ingested).set_index("sop_instance_uid")
    assert (table["split"].to_numpy() == meta.loc[table["sop_instance_uid"], "manifest_split"].to_numpy()).all()
    assert result.source == "manifest"
    assert result.images == {"train": 240, "val": 60, "test": 60}
    assert sum(result.labels["test"].values()) == 60
    assert table.groupby("patient_id")["split"].nunique().max() == 1


def test_grouped_split_never_puts_a_patient_in_two_splits(ingested, tmp_path):
    cfg = SplitConfig(use_manifest_split=False, val_fraction=0.2, test_fraction=0.2, seed=7)
    out = tmp_path / "split.csv"
    result = split_stage.run(cfg, metadata=ingested / "metadata.parquet", out=out)
    table = pd.read_csv(out)
    assert result.source == "grouped"
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    # Patients are whole (4 images): fractions are met to within a couple of patients per stratum.
    n = len(table)
    assert abs(result.images["test"] / n - 0.2) < 0.05
    assert abs(result.images["val"] / n - 0.2) < 0.05
    # Stratified: the positive rate of each split is close to the overall rate.
    overall = table["label"].mean()
    for name in ("train", "val", "test"):
        assert abs(table.loc[table["split"] == name, "label"].mean() - overall) < 0.06


def test_grouped_split_is_seeded(ingested, tmp_path):
    cfg = SplitConfig(use_manifest_split=False, seed=3)
    a = split_stage.make_split(cfg, _meta(ingested))[0]
    b = split_stage.make_split(cfg, _meta(ingested))[0]
    c = split_stage.make_split(cfg.model_copy(update={"seed": 4}), _meta(ingested))[0]
    assert a.equals(b)
    assert not a.reset_index(drop=True)["split"].equals(
        c.set_index("sop_instance_uid").loc[a["sop_instance_uid"], "split"].reset_index(drop=True)
    )


def test_manifest_without_a_value_everywhere_falls_back_to_grouping(ingested):
    meta = _meta(ingested)
    meta.loc[meta.index[0], "manifest_split"] = None
    table, source = split_stage.make_split(SplitConfig(), meta)
    assert source == "grouped"
    assert table.groupby("patient_id")["split"].nunique().max() == 1


def test_manifest_that_splits_a_patient_is_rejected(ingested):
    meta = _meta(ingested)
    pid = meta["patient_id"].iloc[0]
    rows = meta.index[meta["patient_id"] == pid]
    meta.loc[rows[0], "manifest_split"] = "train"
    meta.loc[rows[1], "manifest_split"] = "test"
    with pytest.raises(SplitError, match="1 patient"):
        split_stage.make_split(SplitConfig(), meta)


def test_unlabelled_rows_are_left_out_and_counted(ingested, tmp_path):
    meta = _meta(ingested)
    meta.loc[meta.index[:5], "label"] = pd.NA
    path = tmp_path / "metadata.parquet"
    meta.to_parquet(path)
    result = split_stage.run(SplitConfig(), metadata=path, out=tmp_path / "split.csv")
    assert result.n_unlabeled == 5
    assert result.n_images == len(meta) - 5


def test_too_few_patients_is_a_split_error():
    meta = pd.DataFrame(
        {"sop_instance_uid": ["a", "b", "c"], "patient_id": ["p", "p", "q"], "label": [0, 1, 1]}
    )
    with pytest.raises(SplitError, match="at least 3 patients"):
        split_stage.make_split(SplitConfig(use_manifest_split=False), meta)


def test_load_split_images_matches_metadata(ingested, tmp_path):
    out = tmp_path / "split.csv"
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=out)
    images, labels, rows = data.load_split_images(ingested, out, "val")
    assert images.shape == (60, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (60,)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.allclose(images[:, :, :, 0].mean(axis=(1, 2)), rows["pixel_mean"], atol=1e-6)
    with pytest.raises(SplitError, match="unknown split"):
        data.select_split(ingested, out, "holdout")
