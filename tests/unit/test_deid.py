"""deid: PS3.15 Annex E Basic Profile. Synthetic PHI canaries must not survive anywhere."""

from __future__ import annotations

import io
import logging
import os
import stat

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from medops.config import DeidConfig
from medops.dicom import deid

KEY = b"unit-test-key-0123456789abcdef"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1111111111"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2222222222"
CANARIES = ["Canaryname", "Canarygiven", "CANARY-PID-77", "Canary General", "Canarydoc", "CANACC99",
            "Canary Street", "555-0199", "CANARYAE", "CANARY-OTHER-ID", "Canarynested", "CANARYPRIV",
            "Canaryoperator", "Canary study note", "19610704", "20240229", "CANARYSTATION",
            STUDY_UID, SERIES_UID, "1.2.826.0.1.3680043.8.498.3333", "CANARY-DEVICE-SN",
            "CANARYUN", "Canaryverifier"]


def phi_dataset(sop_suffix: str, *, patient_id: str = "CANARY-PID-77") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3333.{sop_suffix}"
    ds.file_meta.SourceApplicationEntityTitle = "CANARYAE"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3333.{sop_suffix}"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientName = "Canaryname^Canarygiven"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610704"
    ds.PatientSex = "F"
    ds.PatientAddress = "1 Canary Street"
    ds.PatientTelephoneNumbers = "555-0199"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240229"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "CANACC99"
    ds.InstitutionName = "Canary General"
    ds.ReferringPhysicianName = "Canarydoc^Eve"
    ds.OperatorsName = "Canaryoperator^Bob"
    ds.StationName = "CANARYSTATION"
    ds.DeviceSerialNumber = "CANARY-DEVICE-SN"
    ds.StudyDescription = "Canary study note"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "CANARY-OTHER-ID"
    # a kept sequence whose item holds a name, a UID reference, a date and a private tag
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.3333.0"
    item.VerifyingObserverName = "Canarynested^Ann"
    item.add_new(0x00091010, "LO", "CANARYPRIV nested")
    ds.SourceImageSequence = Sequence([item])
    # a Type 2 sequence the profile empties (Z): its item must not survive
    ds.VerifyingObserverIdentificationCodeSequence = Sequence([Dataset()])
    ds.VerifyingObserverIdentificationCodeSequence[0].CodeMeaning = "Canaryverifier"
    ds.add_new(0x00709999, "UN", b"CANARYUN")  # a public tag this pydicom does not know
    # several UIDs in one element: the instance UID is replaced, the registered one kept
    ds.FailedSOPInstanceUIDList = ["1.2.826.0.1.3680043.8.498.3333.7", "1.2.840.10008.5.1.4.1.1.1"]
    ds.add_new(0x00290010, "LO", "CANARY VENDOR")
    ds.add_new(0x00291001, "LO", "CANARYPRIV")
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes([0, 1, 2, 3])
    return ds


def written(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("longitudinal", [False, True])
def test_no_canary_survives(longitudinal):
    out = deid.deidentify(phi_dataset("1"), KEY, retain_longitudinal=longitudinal)
    data = written(out).lower()
    for canary in CANARIES:
        assert canary.lower().encode() not in data, canary
    assert not any(elem.tag.is_private for elem in out.iterall())
    # what the model and the quality checks need is still there
    assert (out.Modality, out.BodyPartExamined, out.PatientSex) == ("CR", "CHEST", "F")
    assert out.PatientAge == "062Y"  # 1961-07-04 -> 2024-02-29, computed before the dates went
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # registered UIDs are kept
    assert out.SourceImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert np.array_equal(pydicom.dcmread(io.BytesIO(written(out))).pixel_array, [[0, 1], [2, 3]])


def test_deidentification_is_recorded():
    out = deid.deidentify(phi_dataset("1"), KEY)
    assert out.PatientIdentityRemoved == "YES"
    assert "Basic" in out.DeidentificationMethod
    codes = {(c.CodeValue, c.CodingSchemeDesignator) for c in out.DeidentificationMethodCodeSequence}
    assert ("113100", "DCM") in codes and ("113108", "DCM") in codes
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_uids_are_consistent_across_files_of_one_study_and_references_follow():
    a = deid.deidentify(phi_dataset("1"), KEY)
    b = deid.deidentify(phi_dataset("2"), KEY)
    assert a.StudyInstanceUID == b.StudyInstanceUID != STUDY_UID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != SERIES_UID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    # a reference to image "0" is replaced by the same UID image "0" itself would get
    ref = a.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref == deid.pseudonymize_uid("1.2.826.0.1.3680043.8.498.3333.0", KEY)


def test_patient_pseudonym_is_stable_and_keyed():
    a = deid.deidentify(phi_dataset("1"), KEY)
    b = deid.deidentify(phi_dataset("2"), KEY)
    other = deid.deidentify(phi_dataset("3", patient_id="SOMEONE-ELSE"), KEY)
    rekeyed = deid.deidentify(phi_dataset("1"), b"another-key-0123456789abcdef")
    assert a.PatientID == b.PatientID == str(a.PatientName)
    assert a.PatientID.startswith("ANON") and "CANARY" not in a.PatientID
    assert other.PatientID != a.PatientID
    assert rekeyed.PatientID != a.PatientID and rekeyed.StudyInstanceUID != a.StudyInstanceUID


def test_retain_longitudinal_shifts_dates_per_patient_keeping_intervals():
    first, later = phi_dataset("1"), phi_dataset("2")
    later.StudyDate = later.ContentDate = "20240310"  # 10 days after the first study
    a = deid.deidentify(first, KEY, retain_longitudinal=True)
    b = deid.deidentify(later, KEY, retain_longitudinal=True)
    import datetime as dt

    da, db = (dt.datetime.strptime(x.StudyDate, "%Y%m%d").date() for x in (a, b))
    assert (db - da).days == 10
    assert a.StudyDate != "20240229" and not a.PatientBirthDate
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ("113107", "DCM") in {(c.CodeValue, c.CodingSchemeDesignator)
                                 for c in a.DeidentificationMethodCodeSequence}


def test_patient_age_from_the_original_header():
    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = "20200615", "20240614"
    assert deid.patient_age_years(ds) == 3
    ds.StudyDate = "20240615"
    assert deid.patient_age_years(ds) == 4
    ds.PatientAge = "018M"
    assert deid.patient_age_years(ds) == 1  # the header's own age wins
    assert deid.patient_age_years(Dataset()) is None


def test_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDOPS_TEST_DEID", "s3cret-from-env")
    assert deid.resolve_deid_key(DeidConfig(key_env="MEDOPS_TEST_DEID"), state_dir=tmp_path) == b"s3cret-from-env"
    assert not (tmp_path / "secrets").exists()


def test_key_file_is_created_once_private_and_never_logged(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("MEDOPS_TEST_DEID", raising=False)
    cfg = DeidConfig(key_env="MEDOPS_TEST_DEID")
    with caplog.at_level(logging.WARNING, logger="medops.dicom.deid"):
        key = deid.resolve_deid_key(cfg, state_dir=tmp_path)
    path = tmp_path / "secrets" / "deid.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "deid.key" in caplog.text and key.hex() not in caplog.text and repr(key) not in caplog.text
    caplog.clear()
    assert deid.resolve_deid_key(cfg, state_dir=tmp_path) == key
    assert caplog.text == ""


def test_key_file_defaults_to_the_project_state_folder(monkeypatch, tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("MEDOPS_ROOT", str(tmp_path))
    monkeypatch.delenv("MEDOPS_TEST_DEID", raising=False)
    deid.resolve_deid_key(DeidConfig(key_env="MEDOPS_TEST_DEID"))
    assert (tmp_path / ".medops" / "secrets" / "deid.key").is_file()


# PS3.15 Table E.1-1, Basic Profile, with the choice deid.py documents where the table allows one:
# Z/D -> D (the pseudonym) for the patient's name and ID, Z for Type 2 attributes, X otherwise, U for
# UIDs, K for patient characteristics (E.3.7 Retain Patient Characteristics)
TABLE_E_1_1 = {
    "PatientName": "D", "PatientID": "D", "PatientBirthDate": "Z", "PatientSex": "K", "PatientAge": "K",
    "PatientAddress": "X", "OtherPatientIDsSequence": "X", "PatientTelephoneNumbers": "X",
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U", "ReferencedSOPInstanceUID": "U",
    "AccessionNumber": "Z", "StudyID": "Z", "StudyDate": "Z", "StudyTime": "Z",
    "ReferringPhysicianName": "Z", "SeriesDate": "X", "AcquisitionDateTime": "X",
    "InstitutionName": "X", "InstitutionAddress": "X", "StationName": "X", "OperatorsName": "X",
    "DeviceSerialNumber": "X", "StudyDescription": "X", "ImageComments": "X", "ProtocolName": "X",
}


def test_profile_actions_follow_table_e_1_1():
    from pydicom.datadict import tag_for_keyword

    actions = {k: deid.PROFILE.get(Tag(tag_for_keyword(k))) for k in TABLE_E_1_1}
    assert actions == TABLE_E_1_1
    # D writes the patient's pseudonym: right for these two attributes only
    assert {t for t, a in deid.PROFILE.items() if a == "D"} == {Tag("PatientName"), Tag("PatientID")}
    # what the model and the checks need is not in the table: kept (or, UIDs, left if registered)
    for keyword in ("Modality", "BodyPartExamined", "Rows", "Columns", "PhotometricInterpretation",
                    "PixelData", "SOPClassUID"):
        assert Tag(tag_for_keyword(keyword)) not in deid.PROFILE, keyword


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
@pytest.mark.parametrize("longitudinal", [False, True])
def test_elements_left_as_read_get_the_same_actions_as_parsed_ones(transfer_syntax, longitudinal):
    """Ingest de-identifies a data set whose values are parsed only where an action needs them
    (kept elements are copied as read, VRs of implicit-VR files come from the dictionary, new
    values are stored already encoded): the written file must hold no canary and the same
    elements and values as the fully parsed path and as de-identifying the data set in memory
    (where every new value is a pydicom DataElement)."""
    from medops.dicom.io import encode_file, read_dataset

    source = phi_dataset("1")
    source.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, source, enforce_file_format=True)
    outputs = []
    for parse_all in (True, False):
        ds = read_dataset(buf.getvalue(), parse_all=parse_all)
        if not parse_all:  # really left as read: only what the profile touches gets parsed
            assert all(ds.get_item(tag).is_raw for tag in ds.keys())
        deid.deidentify(ds, KEY, retain_longitudinal=longitudinal)
        if not parse_all:
            assert ds.get_item(Tag("Modality")).is_raw and ds.get_item(Tag("Rows")).is_raw
        outputs.append(encode_file(ds))
    in_memory = deid.deidentify(phi_dataset("1"), KEY, retain_longitudinal=longitudinal)
    in_memory.file_meta.TransferSyntaxUID = transfer_syntax
    outputs.append(encode_file(in_memory))
    for data in outputs:
        for canary in CANARIES:
            assert canary.lower().encode() not in data.lower(), canary
    parsed, lazy, memory = (pydicom.dcmread(io.BytesIO(data)) for data in outputs)
    elements = [(e.tag, e.VR, e.value) for e in memory.iterall()]
    assert [(e.tag, e.VR, e.value) for e in lazy.iterall()] == elements
    assert [(e.tag, e.VR, e.value) for e in parsed.iterall()] == elements
    assert lazy.file_meta == parsed.file_meta == memory.file_meta and lazy.PatientIdentityRemoved == "YES"
    assert len(lazy.DeidentificationMethodCodeSequence) == (3 if longitudinal else 2)
    if longitudinal:  # dates shifted, not emptied
        assert lazy.StudyDate and lazy.StudyDate != "20240229" and lazy.StudyDate == memory.StudyDate
