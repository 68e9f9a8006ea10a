"""Turn the bundled PneumoniaMNIST into a hospital-like DICOM export with synthetic PHI (demo data).

Inputs:  ``source_npz``: PneumoniaMNIST (``{train,val,test}_images`` uint8 (N, 28, 28) and
         ``{train,val,test}_labels`` (N, 1); 1 = pneumonia).
Outputs: ``out_dir/dicom/PATnnnnn/STnnn/IMnnnnn.dcm``: one CR (or DX) Image Storage file per image,
         8-bit MONOCHROME2, explicit VR little endian, with realistic identifying headers (names,
         IDs, birth dates, accession numbers, physicians, the institution, a vendor private block)
         that are synthetic on purpose: ingest must remove them.
         ``out_dir/labels.csv``: ``sop_instance_uid, path, label, split`` (path relative to
         ``out_dir/dicom``, split = the official PneumoniaMNIST split).
Params:  ``synth`` (seed, modality, images_per_patient, max_images_per_split, institution).

Each synthetic patient has 2..5 images (``images_per_patient``) from ONE official split and ONE
label, grouped into studies of one or two images, so patient-level splits are possible and the
official split is honoured. Everything derives from ``seed`` (UIDs ``2.25.<int>`` from a seeded
generator, fixed dates), so the same params give the same bytes and DVC sees the same hash. Folder
and file names are counters: no PHI in names.
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydantic import BaseModel
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medops.atomic import atomic_write
from medops.config import SynthConfig

SPLITS = ("train", "val", "test")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
# medops' own implementation identity in the file meta (PS3.7 D.3.3.2), fixed so the bytes do not
# depend on the installed pydicom version
IMPLEMENTATION_CLASS_UID = "2.25.164379224683301542405627311478395741113"
IMPLEMENTATION_VERSION = "MEDOPS_SYNTH_1"
PRIVATE_CREATOR = "SYNTH HOSPITAL PACS"
# PneumoniaMNIST comes from paediatric chest radiographs (ages 1 to 5); 28 px cover ~20 cm
PIXEL_SPACING = "7.142857"

_FIRST = ("Olivia", "Liam", "Emma", "Noah", "Ava", "Elijah", "Sophia", "Lucas", "Mia", "Mateo",
          "Amelia", "Levi", "Harper", "Ezra", "Evelyn", "Leo", "Aria", "Kai", "Chloe", "Wei",
          "Mei", "Jun", "Ling", "Hao", "Yan", "Priya", "Arjun", "Fatima", "Omar", "Zara",
          "Ines", "Mateus", "Lena", "Jonas", "Sofia", "Marco", "Nora", "Felix", "Ida", "Hugo")
_LAST = ("Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Rodriguez",
         "Martinez", "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou",
         "Patel", "Khan", "Nguyen", "Kim", "Silva", "Santos", "Muller", "Schmidt", "Rossi",
         "Dubois", "Novak", "Larsen", "Okafor", "Mensah", "Haddad", "Cohen", "Tanaka", "Sato")
_PHYSICIANS = ("Hart^Eleanor^^Dr.", "Osei^Kwame^^Dr.", "Lindqvist^Maja^^Dr.", "Fernandes^Rui^^Dr.",
               "Nakamura^Aiko^^Dr.", "Brennan^Patrick^^Dr.")
_OPERATORS = ("Tech^Robin", "Tech^Sam", "Tech^Alex", "Tech^Jordan")
_EPOCH = dt.date(2024, 1, 1)


class SynthResult(BaseModel):
    """What ``synth`` wrote."""

    files: int
    patients: int
    studies: int
    by_split: dict[str, int]
    by_label: dict[str, int]
    dicom_dir: Path
    manifest: Path


@dataclass(frozen=True)
class _Image:
    split: str
    index: int  # position in the split's arrays
    label: int


def _uid(rng: np.random.Generator) -> str:
    """A UUID-derived UID (PS3.5 B.2): 2.25 followed by a 128-bit integer."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def _da(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def load_pneumoniamnist(source_npz: Path, max_per_split: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 (N, H, W), labels int (N,))}``, at most ``max_per_split`` of each.

    A subset keeps the split's class balance (see ``stratified_head``): the official files are
    ordered so that the first images of a split can all share one label.
    """
    with np.load(source_npz) as npz:
        out = {}
        for split in SPLITS:
            images = np.asarray(npz[f"{split}_images"], dtype=np.uint8)
            labels = np.asarray(npz[f"{split}_labels"]).reshape(-1).astype(int)
            if max_per_split is not None and max_per_split < len(labels):
                keep = stratified_head(labels, max_per_split)
                images, labels = images[keep], labels[keep]
            out[split] = (images, labels)
    return out


def stratified_head(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` images: the first of each label, in the labels' proportions, in file order.

    Every label present keeps at least one image, so a small subset still has both classes.
    """
    values, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    while quota.sum() < n:  # hand out what flooring left over, largest class first
        quota[np.argmax(counts - quota)] += 1
    while quota.sum() > n:
        quota[np.argmax(quota)] -= 1
    keep = [np.flatnonzero(labels == v)[:q] for v, q in zip(values, quota)]
    return np.sort(np.concatenate(keep))


def group_into_patients(labels_by_split: dict[str, np.ndarray], images_per_patient: tuple[int, int],
                        rng: np.random.Generator) -> list[list[_Image]]:
    """Group images into patients: each patient's images share one split and one label.

    Within a (split, label) group the images are taken in their original order in runs of
    ``images_per_patient`` (a seeded draw per patient); a last short run is still a patient.
    """
    lo, hi = images_per_patient
    patients: list[list[_Image]] = []
    for split in SPLITS:
        labels = labels_by_split[split]
        for label in (0, 1):
            idx = np.flatnonzero(labels == label)
            pos = 0
            while pos < len(idx):
                n = int(rng.integers(lo, hi + 1))
                patients.append([_Image(split, int(i), label) for i in idx[pos:pos + n]])
                pos += n
    return patients


def _patient_identity(rng: np.random.Generator, number: int) -> dict[str, object]:
    sex = "M" if rng.random() < 0.5 else "F"
    first = _FIRST[int(rng.integers(len(_FIRST)))]
    middle = _FIRST[int(rng.integers(len(_FIRST)))][0]
    last = _LAST[int(rng.integers(len(_LAST)))]
    first_study = _EPOCH + dt.timedelta(days=int(rng.integers(0, 700)))
    age_days = int(rng.integers(365, 6 * 365))
    return {
        "PatientName": f"{last}^{first}^{middle}",
        "PatientID": f"MRN{int(rng.integers(10_000_000, 99_999_999))}",
        "PatientSex": sex,
        "birth": first_study - dt.timedelta(days=age_days),
        "first_study": first_study,
        "address": f"{int(rng.integers(1, 999))} {_LAST[int(rng.integers(len(_LAST)))]} Street, Springfield",
        "phone": f"555-{int(rng.integers(1000, 9999))}",
        "mother": f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}",
        "number": number,
    }


def _age_string(birth: dt.date, on: dt.date) -> str:
    """Patient's Age (0010,1010), AS VR: nnnY, or nnnM under two years (PS3.5 6.2)."""
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    return f"{months:03d}M" if months < 24 else f"{months // 12:03d}Y"


def build_dataset(cfg: SynthConfig, pixels: np.ndarray, *, patient: dict[str, object],
                  study: dict[str, object], instance: int, sop_uid: str, series_uid: str,
                  rng: np.random.Generator) -> Dataset:
    """One CR / DX Image Storage data set (PS3.3 A.2 / A.26) holding an 8-bit MONOCHROME2 image."""
    day: dt.date = study["date"]  # type: ignore[assignment]
    time = str(study["time"])
    sop_class = CR_IMAGE_STORAGE if cfg.modality == "CR" else DX_IMAGE_STORAGE_PRESENTATION

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = _da(day)
    ds.InstanceCreationTime = time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    _set_patient(ds, patient, day)
    _set_study_and_series(ds, cfg, study, series_uid=series_uid, instance=instance)
    _set_acquisition(ds, cfg, study, rng)
    _set_image_pixels(ds, pixels)

    # a vendor private block that repeats PHI, as real PACS exports do (PS3.5 7.8.1)
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", str(patient["PatientID"]))
    block.add_new(0x02, "LO", f"{patient['PatientName']} ward 4B")
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    """The file meta information (PS3.10 7.1): explicit VR little endian, medops' implementation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _set_patient(ds: Dataset, patient: dict[str, object], day: dt.date) -> None:
    """The patient's identifying headers (PS3.3 C.7.1.1), their age on ``day`` and other IDs."""
    ds.PatientName = str(patient["PatientName"])
    ds.PatientID = str(patient["PatientID"])
    ds.IssuerOfPatientID = "SSGH"
    ds.PatientBirthDate = _da(patient["birth"])  # type: ignore[arg-type]
    ds.PatientSex = str(patient["PatientSex"])
    ds.PatientAge = _age_string(patient["birth"], day)  # type: ignore[arg-type]
    ds.PatientAddress = str(patient["address"])
    ds.PatientTelephoneNumbers = str(patient["phone"])
    ds.PatientMotherBirthName = str(patient["mother"])
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = f"NHS{int(patient['number']) + 4_000_000:09d}"
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = "NATIONAL"
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"


def _set_study_and_series(ds: Dataset, cfg: SynthConfig, study: dict[str, object], *,
                          series_uid: str, instance: int) -> None:
    """Study, series, equipment and request headers: dates, UIDs, numbers, the institution and the
    people involved (PS3.3 C.7.2.1, C.7.3.1, C.7.5.1)."""
    day: dt.date = study["date"]  # type: ignore[assignment]
    time = str(study["time"])
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(day)
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = str(study["accession"])
    ds.Modality = cfg.modality
    ds.Manufacturer = "Synthetic Imaging Co."
    ds.InstitutionName = cfg.institution
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.ReferringPhysicianName = str(study["referrer"])
    ds.StationName = "XR-ROOM-2"
    ds.StudyDescription = "XR CHEST 1 VIEW PAEDIATRIC"
    ds.SeriesDescription = f"CHEST {study['view']}"
    ds.InstitutionalDepartmentName = "Paediatric Radiology"
    ds.PerformingPhysicianName = str(study["performer"])
    ds.OperatorsName = str(study["operator"])
    ds.ManufacturerModelName = "SynthRad 3000"

    ds.StudyInstanceUID = str(study["uid"])
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(study["study_id"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.PatientOrientation = ["L", "F"] if study["view"] == "PA" else ["R", "F"]
    ds.RequestAttributesSequence = Sequence([Dataset()])
    ds.RequestAttributesSequence[0].RequestedProcedureID = f"RP{study['accession']}"
    ds.RequestAttributesSequence[0].ScheduledProcedureStepID = f"SPS{study['accession']}"
    ds.RequestAttributesSequence[0].RequestedProcedureDescription = "Chest radiograph, ?pneumonia"


def _set_acquisition(ds: Dataset, cfg: SynthConfig, study: dict[str, object], rng: np.random.Generator) -> None:
    """How the radiograph was taken: body part, view, device, exposure (three seeded draws, in this
    order), detector spacing, and the DX-only headers when ``cfg.modality`` is DX."""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = str(study["view"])
    ds.DeviceSerialNumber = "SR3K-000417"
    ds.SoftwareVersions = "4.2.1"
    ds.KVP = f"{int(rng.integers(55, 75))}"
    ds.ExposureTime = f"{int(rng.integers(4, 16))}"
    ds.XRayTubeCurrent = f"{int(rng.integers(160, 320))}"
    ds.ImagerPixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]

    if cfg.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"


def _set_image_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """The image pixel module (PS3.3 C.7.6.3) for 8-bit MONOCHROME2 ``pixels`` (rows, cols), an
    identity VOI window, and the pixel data."""
    rows, cols = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    # center 128, width 256 is the identity window for 8-bit data under PS3.3 C.11.2.1.2.1
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def _write_patient(cfg: SynthConfig, data: dict, images: list[_Image], patient: dict[str, object],
                   rng: np.random.Generator, dicom_dir: Path, folder: str,
                   written: Callable[[tuple[str, str, int, str]], None]) -> int:
    """One patient's studies (one or two images each) below ``dicom_dir/folder``; each file's
    manifest row goes to ``written``. Returns the number of studies."""
    day: dt.date = patient["first_study"]  # type: ignore[assignment]
    pos = 0
    s_number = 0
    while pos < len(images):
        n = int(rng.integers(1, 3))  # one or two images per study
        s_number += 1
        study = {
            "uid": _uid(rng),
            "date": day,
            "time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}"
                    f"{int(rng.integers(0, 60)):02d}",
            "accession": f"A{int(rng.integers(10_000_000, 99_999_999))}",
            "study_id": f"{int(rng.integers(1000, 9999))}",
            "referrer": _PHYSICIANS[int(rng.integers(len(_PHYSICIANS)))],
            "performer": _PHYSICIANS[int(rng.integers(len(_PHYSICIANS)))],
            "operator": _OPERATORS[int(rng.integers(len(_OPERATORS)))],
            "view": "AP" if rng.random() < 0.7 else "PA",  # AP is usual for small children
        }
        series_uid = _uid(rng)
        for instance, image in enumerate(images[pos:pos + n], start=1):
            sop_uid = _uid(rng)
            pixels = data[image.split][0][image.index]
            ds = build_dataset(cfg, pixels, patient=patient, study=study, instance=instance,
                               sop_uid=sop_uid, series_uid=series_uid, rng=rng)
            rel = Path(folder) / f"ST{s_number:03d}" / f"IM{instance:05d}.dcm"
            if instance == 1:
                (dicom_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(dicom_dir / rel, ds, enforce_file_format=True)
            written((sop_uid, rel.as_posix(), image.label, image.split))
        pos += n
        day = day + dt.timedelta(days=int(rng.integers(3, 60)))
    return s_number


def _write_manifest(path: Path, rows: list[tuple[str, str, int, str]]) -> None:
    with atomic_write(path, "w", newline="") as fh:  # ingest never reads half a manifest
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["sop_instance_uid", "path", "label", "split"])
        writer.writerows(rows)


def _result(rows: list[tuple[str, str, int, str]], patients: int, studies: int, dicom_dir: Path,
            manifest: Path) -> SynthResult:
    by_split = {s: sum(1 for r in rows if r[3] == s) for s in SPLITS}
    by_label = {str(v): sum(1 for r in rows if r[2] == v) for v in (0, 1)}
    return SynthResult(files=len(rows), patients=patients, studies=studies, by_split=by_split,
                       by_label=by_label, dicom_dir=dicom_dir, manifest=manifest)


def run(cfg: SynthConfig, *, source_npz: Path, out_dir: Path,
        progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Write the synthetic DICOM export and its label manifest; see the module docstring.

    ``progress(done, total)`` is called after each file written (e.g. the CLI's progress bar).
    """
    source_npz, out_dir = Path(source_npz), Path(out_dir)
    data = load_pneumoniamnist(source_npz, cfg.max_images_per_split)
    rng = np.random.default_rng(cfg.seed)
    patients = group_into_patients({s: data[s][1] for s in SPLITS}, cfg.images_per_patient, rng)
    total = sum(len(images) for images in patients)

    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(dicom_dir.glob("PAT[0-9]*")):  # an earlier export: keep no stale files
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    rows: list[tuple[str, str, int, str]] = []

    def written(row: tuple[str, str, int, str]) -> None:
        rows.append(row)
        if progress is not None:
            progress(len(rows), total)

    n_studies = 0
    for p_number, images in enumerate(patients, start=1):
        patient = _patient_identity(rng, p_number)
        n_studies += _write_patient(cfg, data, images, patient, rng, dicom_dir, f"PAT{p_number:05d}", written)
    manifest = out_dir / "labels.csv"
    _write_manifest(manifest, rows)
    return _result(rows, len(patients), n_studies, dicom_dir, manifest)


def add_studies(cfg: SynthConfig, *, source_npz: Path, out_dir: Path, n: int) -> SynthResult:
    """A new delivery into an existing synthetic export: ``n`` new patients, one or two images
    each, with their own manifest ``labels-add-K.csv`` (K = 1, 2, ... per delivery), as a
    hospital's weekly export adds studies. Images come from the bundled training and validation
    splits, beyond the ones ``run`` used where there are any, each keeping its official split
    and label; identities, UIDs and dates are new (seeded by ``cfg.seed`` and K).
    """
    out_dir = Path(out_dir)
    delivery = 1 + sum(1 for _ in out_dir.glob("labels-add-*.csv"))
    rng = np.random.default_rng([cfg.seed, delivery])
    full = load_pneumoniamnist(Path(source_npz), None)
    pool = [_Image(split, int(i), int(label)) for split in ("train", "val")
            for i, label in enumerate(full[split][1])]
    used = set()
    if cfg.max_images_per_split is not None:
        for split in ("train", "val"):
            used |= {(split, int(i)) for i in stratified_head(full[split][1], cfg.max_images_per_split)}
    fresh = [im for im in pool if (im.split, im.index) not in used] or pool
    picks = rng.choice(len(fresh), size=min(2 * n, len(fresh)), replace=False)
    dicom_dir = out_dir / "dicom"
    rows: list[tuple[str, str, int, str]] = []
    studies = 0
    for k in range(n):
        # one patient, one split and one label: up to two images of the same (split, label)
        first = fresh[int(picks[2 * k])] if 2 * k < len(picks) else fresh[int(rng.integers(len(fresh)))]
        second = fresh[int(picks[2 * k + 1])] if 2 * k + 1 < len(picks) else None
        images = [first] + ([second] if second and (second.split, second.label) == (first.split, first.label)
                            and rng.random() < 0.5 else [])
        patient = _patient_identity(rng, 90_000 + 1_000 * delivery + k)
        studies += _write_patient(cfg, full, images, patient, rng, dicom_dir,
                                  f"ADD{delivery:03d}/PAT{k + 1:05d}", rows.append)
    manifest = out_dir / f"labels-add-{delivery}.csv"
    _write_manifest(manifest, rows)
    return _result(rows, n, studies, dicom_dir, manifest)
