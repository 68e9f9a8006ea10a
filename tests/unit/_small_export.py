"""A small synthetic export of tiny CT files, for the tests of ingest at scale (the Dask path,
the dataset layout, the S3 remote). Test helper, not a test module: import it as
``from _small_export import write_small_export`` from tests/unit, or add tests/unit to sys.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def small_ct(index: int, *, study_uid: str = "2.25.1001", patient_id: str = "MEM0001",
             patient_name: str = "Memory^Test"):
    """A 16 x 16 CT data set whose pixels and SOP Instance UID follow from ``index``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    sop = f"2.25.{10**30 + index}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, "2.25.1002"
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientSex = "CT", patient_id, patient_name, "O"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(index).integers(0, 4096, (16, 16), dtype=np.uint16).tobytes()
    return ds


def write_small_export(folder: Path, n: int) -> Path:
    """``n`` tiny (16 x 16) CT files in series of 50, plus a text file and a truncated copy."""
    for i in range(n):
        target = folder / f"series{i // 50:03d}" / f"IM{i:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        small_ct(i, study_uid=f"2.25.{2000 + i // 50}", patient_id=f"P{i // 50:04d}",
                 patient_name="Scale^Test").save_as(target, enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    data = (folder / "series000" / "IM00000.dcm").read_bytes()
    (folder / "series000" / "cut.dcm").write_bytes(data[: len(data) // 2])
    return folder
