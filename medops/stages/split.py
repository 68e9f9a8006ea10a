"""split: assign every labelled image to train / val / test, at the patient level.

Images of one patient are strongly correlated, so a patient appearing in two splits leaks the test
set into training. The split is therefore made over patients and checked afterwards: a patient in
two splits is a stage failure (SplitError), never a warning.

Inputs:
    metadata: ``data/ingested/metadata.parquet`` (medops.data format).
Outputs:
    out: ``data/split/split.csv`` with ``sop_instance_uid, patient_id, label, split``.
Params (``split`` section, SplitConfig):
    use_manifest_split: honour the manifest's ``manifest_split`` column when every row has one.
    val_fraction, test_fraction: fractions of images for the seeded patient-grouped split.
    seed: seed of that split.

The stages downstream read one split's rows and pixels with ``medops.data.load_split_images``.
numpy and pandas only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from medops.atomic import atomic_path
from medops.config import SplitConfig
from medops.data import SPLIT_COLUMNS, SPLITS, check_patient_disjoint
from medops.errors import SplitError

class SplitResult(BaseModel):
    source: Literal["manifest", "grouped"]
    n_images: int
    n_patients: int
    n_unlabeled: int                      # rows without a label, left out of every split
    images: dict[str, int]                # split -> images
    patients: dict[str, int]              # split -> patients
    labels: dict[str, dict[str, int]]     # split -> {"0": n, "1": n}
    out: str


def has_manifest_split(frame: pd.DataFrame) -> bool:
    """True when every row carries a manifest split value (train / val / test)."""
    if "manifest_split" not in frame.columns or len(frame) == 0:
        return False
    col = frame["manifest_split"]
    return bool(col.notna().all() and col.isin(SPLITS).all())


def assign_patient_splits(
    patients: pd.Series,
    labels: pd.Series,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.Series:
    """A seeded split of patients into train / val / test, stratified by patient label.

    Each patient gets the label most of its images have (ties -> positive). Within each label
    stratum the patients are shuffled and taken, whole, into test until the stratum's test share of
    images is reached, then into val, the rest into train. Every split gets at least one patient
    when there are at least three.

    Args:
        patients: patient_id per image.
        labels: 0/1 label per image (same index).
        val_fraction, test_fraction: target share of images.
        seed: numpy Generator seed.

    Returns:
        The split name per image, indexed like ``patients``.
    """
    if val_fraction + test_fraction >= 1:
        raise SplitError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    per_patient = (
        pd.DataFrame({"patient_id": patients.to_numpy(), "label": labels.to_numpy()})
        .groupby("patient_id")["label"]
        .agg(["size", "mean"])
    )
    n_patients = len(per_patient)
    if n_patients < 3:
        raise SplitError(f"need at least 3 patients to make train/val/test, got {n_patients}")
    per_patient["stratum"] = (per_patient["mean"] >= 0.5).astype(int)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, stratum in per_patient.groupby("stratum", sort=True):
        ids = stratum.index.to_numpy()
        ids = ids[rng.permutation(len(ids))]
        sizes = stratum.loc[ids, "size"].to_numpy()
        total = sizes.sum()
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        taken = {"test": 0, "val": 0}
        current = "test"
        for pid, size in zip(ids, sizes):
            # Fill test, then val, each up to its share of images; the rest train.
            while current != "train" and taken[current] + size / 2 > targets[current]:
                current = "val" if current == "test" else "train"
            if current != "train":
                taken[current] += size
            assignment[pid] = current
    # Tiny sets: the rounding above can leave a split empty; move one train patient into it.
    for name in ("test", "val"):
        if name not in assignment.values():
            train_ids = sorted(p for p, s in assignment.items() if s == "train")
            if len(train_ids) < 2:
                raise SplitError(f"too few patients ({n_patients}) to give every split one")
            assignment[train_ids[rng.integers(len(train_ids))]] = name
    return patients.map(assignment).rename("split")


def make_split(cfg: SplitConfig, metadata: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The split table for the labelled rows of ``metadata`` and its source ("manifest"/"grouped")."""
    missing = {"sop_instance_uid", "patient_id", "label"} - set(metadata.columns)
    if missing:
        raise SplitError(f"metadata lacks column(s) {sorted(missing)}")
    labelled = metadata[metadata["label"].notna()].copy()
    if labelled["sop_instance_uid"].duplicated().any():
        raise SplitError("metadata has duplicate sop_instance_uid values")
    if cfg.use_manifest_split and has_manifest_split(labelled):
        labelled["split"] = labelled["manifest_split"].astype(str)
        source = "manifest"
    else:
        labelled["split"] = assign_patient_splits(
            labelled["patient_id"],
            labelled["label"].astype(int),
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
        source = "grouped"
    table = labelled.loc[:, list(SPLIT_COLUMNS)].reset_index(drop=True)
    table["label"] = table["label"].astype(int)
    check_patient_disjoint(table)
    empty = [s for s in SPLITS if not (table["split"] == s).any()]
    if empty:
        raise SplitError(f"split {empty} has no images ({source} split of {len(table)} images)")
    return table.sort_values(["split", "patient_id", "sop_instance_uid"], kind="stable"), source


def summarize_split(table: pd.DataFrame) -> dict[str, dict]:
    images = {s: int((table["split"] == s).sum()) for s in SPLITS}
    patients = {s: int(table.loc[table["split"] == s, "patient_id"].nunique()) for s in SPLITS}
    labels = {
        s: {str(k): int(v) for k, v in table.loc[table["split"] == s, "label"].value_counts().sort_index().items()}
        for s in SPLITS
    }
    return {"images": images, "patients": patients, "labels": labels}


def run(cfg: SplitConfig, *, metadata: Path, out: Path) -> SplitResult:
    """Read metadata.parquet, split it by patient and write split.csv."""
    frame = pd.read_parquet(metadata)
    table, source = make_split(cfg, frame)
    out = Path(out)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return SplitResult(
        source=source,
        n_images=len(table),
        n_patients=int(table["patient_id"].nunique()),
        n_unlabeled=int(frame["label"].isna().sum()),
        out=str(out),
        **summarize_split(table),
    )
