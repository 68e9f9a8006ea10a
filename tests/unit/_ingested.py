"""Build a tiny ``data/ingested`` folder (medops.data format) from the bundled PneumoniaMNIST.

Test helper, not a fixture module: import it as ``from _ingested import build_ingested`` from a
test in tests/unit (pytest puts a test file's folder on sys.path), or add tests/unit to sys.path.

The folder holds what the ingest stage writes: ``arrays/shard-*.npy`` (float32 in [0, 1]) and
``metadata.parquet`` with every column of METADATA_COLUMNS. Images are grouped a few per fake
patient (all of one patient's images come from the same official split and share its label), so
patient-level splitting has something to get wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medops.data import ARRAYS_DIR, METADATA_COLUMNS, shard_path
from medops.paths import BUNDLED_DATASET

OFFICIAL_SPLITS = ("train", "val", "test")


def load_bundled() -> dict[str, np.ndarray]:
    with np.load(BUNDLED_DATASET) as npz:
        return {k: npz[k] for k in npz.files}


def build_ingested(
    out_dir: Path,
    *,
    n_per_split: dict[str, int] | None = None,
    images_per_patient: int = 3,
    with_manifest_split: bool = True,
    shard_size: int = 256,
    seed: int = 0,
    with_packs: bool = False,
) -> Path:
    """Write a small ingested folder and return it.

    Args:
        out_dir: folder to create (the ingest stage's ``out_dir``).
        n_per_split: images taken from each official split, e.g. ``{"train": 300, "val": 90}``;
            a seeded random sample of that split (so both classes appear). Default: 120/45/45.
        images_per_patient: images grouped under one fake patient (same split, same label).
        with_manifest_split: fill ``manifest_split`` with the official split, else leave it null.
        shard_size: images per array shard (small values exercise multi-shard loading).
        seed: sampling and patient-attribute seed.
        with_packs: also write each shard's pack of de-identified files (``dicom/shard-N.zip``,
            one 8-bit CR file per row at its ``deid_path``), as ingest does: what the stages that
            read headers (``reference``) need.
    """
    n_per_split = n_per_split or {"train": 120, "val": 45, "test": 45}
    rng = np.random.default_rng(seed)
    data = load_bundled()
    images: list[np.ndarray] = []
    rows: list[dict] = []
    patient_no = 0
    for split in OFFICIAL_SPLITS:
        n = n_per_split.get(split, 0)
        if n == 0:
            continue
        x, y = data[f"{split}_images"], data[f"{split}_labels"][:, 0]
        idx = np.sort(rng.choice(len(x), size=n, replace=False))
        # Group by label so each patient has one label, as a real study would.
        for label in (0, 1):
            chosen = idx[y[idx] == label]
            for start in range(0, len(chosen), images_per_patient):
                patient_no += 1
                pid = f"P{patient_no:05d}"
                sex = ("M", "F", "O")[patient_no % 3]
                age = int(rng.integers(1, 90))
                for i in chosen[start : start + images_per_patient]:
                    img = x[i].astype(np.float32) / 255.0
                    images.append(img)
                    rows.append(
                        {
                            "sop_instance_uid": f"2.25.{split}.{i}",
                            "study_instance_uid": f"2.25.study.{pid}",
                            "series_instance_uid": f"2.25.series.{pid}",
                            "patient_id": pid,
                            "patient_sex": sex,
                            "patient_age": age,
                            "modality": "CR",
                            "rows": img.shape[0],
                            "columns": img.shape[1],
                            "label": int(label),
                            "manifest_split": split if with_manifest_split else None,
                            "pixel_mean": float(img.mean()),
                            "pixel_std": float(img.std()),
                            "pixel_min": float(img.min()),
                            "pixel_max": float(img.max()),
                            "content_sha256": f"{split}-{i:064d}"[-64:],
                            "deid_path": f"dicom/{pid}/{split}-{i}.dcm",
                        }
                    )
    # Shuffle row order so metadata order does not follow split or label.
    order = rng.permutation(len(rows))
    images = [images[i] for i in order]
    rows = [rows[i] for i in order]
    out_dir = Path(out_dir)
    (out_dir / ARRAYS_DIR).mkdir(parents=True, exist_ok=True)
    stack = np.stack(images).astype(np.float32)
    for shard, start in enumerate(range(0, len(stack), shard_size)):
        np.save(shard_path(out_dir, shard), stack[start : start + shard_size])
        for j in range(start, min(start + shard_size, len(stack))):
            rows[j]["shard"] = shard
            rows[j]["shard_index"] = j - start
    frame = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    frame["label"] = frame["label"].astype("Int64")
    frame["patient_age"] = frame["patient_age"].astype("Int64")
    frame["manifest_split"] = frame["manifest_split"].astype(object)
    frame.to_parquet(out_dir / "metadata.parquet", index=False)
    pd.DataFrame(columns=["path", "reason", "detail"]).to_csv(out_dir / "quarantine.csv", index=False)
    if with_packs:
        write_packs(out_dir, frame, stack)
    return out_dir


def write_packs(out_dir: Path, frame: pd.DataFrame, stack: np.ndarray) -> None:
    """Each shard's zip of de-identified files: a CR file of each row's image at its deid_path."""
    import zipfile

    from test_monitor import film_bytes

    from medops.data import pack_path

    for shard, group in frame.groupby("shard"):
        path = pack_path(out_dir, int(shard))
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as pack:
            for i, deid_path in zip(group.index, group["deid_path"]):
                pack.writestr(str(deid_path), film_bytes(np.round(stack[i] * 255)))


def build_trained(
    root: Path,
    *,
    n_per_split: dict[str, int] | None = None,
    epochs: int = 2,
    data_version: str = "test-data-version",
) -> dict[str, Path]:
    """Ingested folder + manifest split + a small simple_cnn trained on it, under ``root``.

    Returns the paths: ingested, split, model, train_result.
    """
    from medops.stages import split as split_stage
    from medops.stages import train as train_stage
    from medops.config import AugmentConfig, SplitConfig, TrainConfig

    root = Path(root)
    ingested = build_ingested(root / "ingested", n_per_split=n_per_split or {"train": 600, "val": 160, "test": 160})
    split_csv = root / "split" / "split.csv"
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=split_csv)
    paths = {
        "ingested": ingested,
        "split": split_csv,
        "model": root / "models" / "model.keras",
        "train_result": root / "models" / "train.json",
    }
    train_stage.run(
        TrainConfig(epochs=epochs, batch_size=32, filters=[16, 32, 64], dense_units=64),
        AugmentConfig(),
        ingested_dir=ingested,
        split=split_csv,
        model_out=paths["model"],
        result_out=paths["train_result"],
        data_version=data_version,
    )
    return paths
