"""deid's smaller promises, each pinned (found open by mutation testing, benchmarks/mutation):
stable pseudonyms and date offsets, the age from the original header, values stored in the
file's own encoding, big-endian files, elements stored as UN."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian

from medops.config import DeidConfig
from medops.dicom import deid
from medops.dicom.io import encode_file, read_dataset

KEY = b"unit-test-key-0123456789abcdef"


def test_pseudonyms_and_date_offsets_do_not_change_between_releases():
    """Golden values: a change here re-identifies nobody but splits every patient and study
    de-identified before it from those after (same key, other pseudonyms)."""
    assert deid.pseudonymize_patient("id:P1", KEY) == "ANON517C22FF5A2A5A34"
    assert deid.pseudonymize_patient("study:1.2.3", KEY) == "ANON629DEC3B415B3D9D"
    assert deid.pseudonymize_uid("1.2.826.0.1.3680043.8.498.1111111111", KEY) == \
        "2.25.272951634741799961908765752689165232590"
    assert [deid.date_shift_days(k, KEY) for k in ("id:P1", "id:P2", "name:A^B|19610704")] == \
        [-3154, -1246, -3479]


def _age(**kw) -> int | None:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return deid.patient_age_years(ds)


@pytest.mark.parametrize("age, years", [("005Y", 5), ("030M", 2), ("110W", 2), ("800D", 2),
                                        ("011M", 0), ("051W", 0), ("364D", 0),
                                        ("012M", 1), ("052W", 1), ("365D", 1)])
def test_an_age_string_in_any_unit_becomes_whole_years(age, years):
    assert _age(PatientAge=age) == years


@pytest.mark.parametrize("age, years", [("5Y", 62), ("0A5Y", 62), ("005Q", 62), ("005X", 62),
                                        ("005y ", 5)])
def test_an_age_string_that_is_not_one_falls_back_to_the_dates(age, years):
    assert _age(PatientAge=age, PatientBirthDate="19610704", StudyDate="20240229") == years


@pytest.mark.parametrize("keyword", ["StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"])
def test_the_age_comes_from_the_first_date_of_the_study_on_or_after_birth(keyword):
    assert _age(PatientBirthDate="20000301", **{keyword: "20100301"}) == 10
    assert _age(PatientBirthDate="20000301", **{keyword: "20100228"}) == 9
    assert _age(PatientBirthDate="20000301", **{keyword: "20000301"}) == 0  # born that day
    # a date before birth is an error in the header: the next date is used
    assert _age(PatientBirthDate="20000301", StudyDate="19990101", **(
        {keyword: "20050301"} if keyword != "StudyDate" else {"SeriesDate": "20050301"})) == 5
    assert _age(PatientBirthDate="20000301", StudyDate="19990101") is None


def test_an_unreadable_age_is_removed_not_kept():
    ds = Dataset()
    ds.PatientAge = "about 60"
    out = deid.deidentify(ds, KEY)
    assert "PatientAge" not in out


def test_several_dates_in_one_element_are_removed_not_partly_shifted():
    """"20240229\\20240301" has a date in its first 8 characters: shifting those would keep
    the second date as it was."""
    ds = Dataset()
    ds.PatientID = "P1"
    ds.add_new(0x00080021, "DA", "20240229\\20240301")
    raw = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    pydicom.dcmwrite(raw, ds, enforce_file_format=True)
    for data in (ds, read_dataset(raw.getvalue(), require_pixels=False, parse_all=False)):
        out = deid.deidentify(data, KEY, retain_longitudinal=True)
        assert "SeriesDate" not in out


def test_an_element_stored_as_un_gets_the_action_of_its_dictionary_vr():
    """A converter that wrote Manufacturer (LO, kept) and an unnamed person name as UN in an
    explicit-VR file: read as stored (as ingest reads), the dictionary's VR decides, as
    pydicom's own parsing would (pydicom turns UN into the known VR only when it parses)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    raw = io.BytesIO()
    pydicom.dcmwrite(raw, ds, enforce_file_format=True)
    # two UN elements appended by hand: pydicom would write their known VRs
    data = raw.getvalue() + b"\x08\x00\x70\x00UN\x00\x00\x04\x00\x00\x00ACME" \
        + b"\x14\x00\x04\x01UN\x00\x00\x0c\x00\x00\x00Canary^Name "
    stored = read_dataset(data, require_pixels=False, parse_all=False)
    assert stored.get_item(0x00080070).VR == "UN"
    out = pydicom.dcmread(io.BytesIO(encode_file(deid.deidentify(stored, KEY))))
    assert out.Manufacturer == "ACME"                                # LO, not named: kept
    assert 0x00140104 in out and not out[0x00140104].value           # an unnamed PN: emptied


def test_a_big_endian_file_is_de_identified_through_pydicom_not_copied_as_little_endian():
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "CANARY-PID", "Canary^Name", "CANACC"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    stored = read_dataset(buf.getvalue(), require_pixels=False, parse_all=False)
    deid.deidentify(stored, KEY)
    data = encode_file(stored)
    assert b"CANARY" not in data.upper()
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.PatientID == str(out.PatientName) == deid.pseudonymize_patient("id:CANARY-PID", KEY)
    assert out.AccessionNumber == "" and out.PatientIdentityRemoved == "YES"


def test_the_key_folder_is_created_with_its_parents_or_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDOPS_TEST_DEID", raising=False)
    state = tmp_path / "not" / "yet"
    key = deid.resolve_deid_key(DeidConfig(key_env="MEDOPS_TEST_DEID"), state_dir=state)
    assert (state / "secrets" / "deid.key").read_bytes() == key
    (tmp_path / "other" / "secrets").mkdir(parents=True)  # the folder is there, the key is not
    key = deid.resolve_deid_key(DeidConfig(key_env="MEDOPS_TEST_DEID"), state_dir=tmp_path / "other")
    assert len(key) == 32


def test_a_private_sop_class_is_replaced_and_the_file_meta_follows():
    """A SOP Class UID that is not registered (a vendor's) is a UID like any other: replaced,
    and the returned data set's File Meta Information names the same class and instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.999"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    out = deid.deidentify(ds, KEY)
    assert out.SOPClassUID == deid.pseudonymize_uid("1.2.826.0.1.3680043.8.498.999", KEY)
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationVersionName == "MEDOPS_" + __import__("medops").__version__


def test_the_callers_age_is_used_as_given():
    """ingest computes the age before de-identification and passes it: it is not recomputed."""
    ds = Dataset()
    ds.PatientAge, ds.PatientSex = "062Y", "F"
    assert deid.deidentify(ds, KEY, age=40).PatientAge == "040Y"
    ds = Dataset()
    ds.PatientAge = "062Y"
    assert "PatientAge" not in deid.deidentify(ds, KEY, age=None)  # unknown: removed
    ds = Dataset()
    ds.PatientAge = "062Y"
    assert "PatientAge" not in deid.deidentify(ds, KEY, age=40, retain_characteristics=False)
