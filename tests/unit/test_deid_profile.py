"""deid's action table is data that is checked: against PS3.15 Table E.1-1 (the vendored copy in
medops.dicom.table_e1_1), and against the action codes deid implements."""

from __future__ import annotations

import pytest
from _deid_standard import ADDITIONS, CHOICE, DEVIATIONS, expected_table, unnamed_tags
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medops.dicom import deid, table_e1_1

KEY = b"unit-test-key-0123456789abcdef"


@pytest.mark.parametrize("characteristics", [True, False])
def test_every_attribute_of_table_e1_1_has_the_action_the_standard_gives(characteristics):
    """Each row of the table (656 in 2026c) is in medops' table with the standard's action, as
    resolved by the choices and deviations written out in tests/unit/_deid_standard.py; any other
    difference, a missing attribute included, fails."""
    table = deid.PROFILE if characteristics else deid.BASIC_PROFILE
    want = expected_table(characteristics=characteristics)
    missing = sorted(Tag(t) for t in want if t not in table)
    assert not missing
    differ = {str(Tag(t)): (table[t], a) for t, a in want.items() if table[t] != a}
    assert not differ
    assert set(table) == set(want)  # and nothing else


def test_the_choices_allowed_by_the_standard_and_the_deviations_are_the_listed_ones():
    assert deid.CHOICES == CHOICE
    # every choice is one the standard's code allows (X/Z/U*: K walks and replaces the UIDs, U*)
    allowed = {"X": "X", "Z": "Z", "U": "U", "X/Z": "XZ", "X/D": "XD", "X/Z/D": "XZD", "Z/D": "ZD",
               "X/Z/U*": "XZK"}
    assert all(deid.CHOICES[code] in allowed[code] for code in allowed)
    assert deid.CHOICES["D"] == "X"  # the one choice outside the code: see deid.CHOICES
    assert {k: a for k, (a, _) in deid.DEVIATIONS.items()} == DEVIATIONS
    assert all(len(reason) > 20 for _, reason in deid.DEVIATIONS.values())
    assert deid.ADDITIONS == ADDITIONS
    named = {r.value for r in table_e1_1.ROWS}
    assert not {int(deid._tag(k)) for k in ADDITIONS} & named  # additions: not in the table


def test_the_vendored_table_is_the_standards_shape():
    rows = table_e1_1.ROWS
    assert len(rows) == 656 and table_e1_1.EDITION == "2026c"
    by_tag = {r.tag: r for r in rows}
    # a few rows read off the standard by hand
    assert by_tag["(0010,0010)"].basic == "Z" and by_tag["(0010,0020)"].basic == "Z/D"
    assert by_tag["(0008,0018)"].basic == "U" and by_tag["(0008,0080)"].basic == "X/Z/D"
    assert by_tag["(0010,0040)"].options == {"characteristics": "K"}
    assert by_tag["(0008,0020)"].options == {"long_full": "K", "long_modified": "C"}
    assert by_tag["(0008,2112)"].basic == "X/Z/U*"
    assert {r.tag for r in rows if r.value is None} == {"(50XX,XXXX)", "(60XX,3000)", "(60XX,4000)",
                                                       "(GGGG,EEEE)"}
    assert {r.basic for r in rows} <= table_e1_1.BASIC_CODES


@pytest.mark.parametrize("line, message", [
    ("(0010,0010)|Q|-|Patient's Name", "unknown Basic Profile action"),
    ("(0010,001)|X|-|Patient's Name", "malformed tag"),
    ("(0010,0010)|X|nope=K|Patient's Name", "unknown option"),
    ("(0010,0010)|X|characteristics=Q|Patient's Name", "unknown option"),
    ("(0010,0010)|X|-|A\n(0010,0010)|Z|-|B", "twice"),
])
def test_a_malformed_table_row_fails_to_load(line, message):
    with pytest.raises(ValueError, match=message):
        table_e1_1._parse(line)


def test_a_code_without_a_medops_choice_or_an_unknown_group_row_fails_the_build(monkeypatch):
    row = table_e1_1.Row("(0010,0010)", "X/Z", {}, "Patient's Name")
    monkeypatch.delitem(deid.CHOICES, "X/Z")
    with pytest.raises(ValueError, match="no medops choice"):
        deid.build_profile((row,), characteristics=True)
    with pytest.raises(ValueError, match="not applied"):
        deid.build_profile((table_e1_1.Row("(70XX,0010)", "X", {}, "new"),), characteristics=True)


@pytest.mark.parametrize("tag, action, message", [
    (Tag("PatientAddress"), "C", "unknown action"),
    (Tag("PatientAddress"), "", "unknown action"),
    (Tag("PatientAddress"), "U", "not a UID"),
    (Tag(0x00709999), "U", "not a UID"),          # unknown to the dictionary: not a UID either
    (Tag("PatientAddress"), "D", "pseudonym"),
])
def test_check_profile_refuses_what_apply_cannot_do(tag, action, message):
    with pytest.raises(ValueError, match=message):
        deid.check_profile({tag: action})
    deid.check_profile({Tag("PatientID"): "D", Tag("PatientName"): "D", Tag("StudyInstanceUID"): "U",
                        tag: "X"})


def test_the_built_tables_are_checked_when_deid_is_imported(monkeypatch):
    """A code _apply does not know (here in DEVIATIONS) makes the module fail to load."""
    import importlib

    monkeypatch.setitem(deid.ADDITIONS, "PatientAddress", "C")
    with pytest.raises(ValueError, match="unknown action 'C'"):
        deid.build_profile(table_e1_1.ROWS, characteristics=False)
    monkeypatch.delitem(deid.ADDITIONS, "PatientAddress")

    monkeypatch.setitem(deid.DEVIATIONS, "PatientAddress", ("C", "a code nobody implements"))
    source = importlib.util.find_spec("medops.dicom.deid")
    module = importlib.util.module_from_spec(source)
    # the module's own DEVIATIONS literal is re-read: patch the source text instead
    text = source.loader.get_source("medops.dicom.deid").replace(
        '"SmokingStatus": ("X",', '"SmokingStatus": ("C",')
    with pytest.raises(ValueError, match="unknown action 'C'"):
        exec(compile(text, "deid.py", "exec"), module.__dict__)
    text = source.loader.get_source("medops.dicom.deid").replace('"UN": "X",\n}', '"UN": "C",\n}')
    with pytest.raises(ValueError, match="safety net"):
        exec(compile(text, "deid.py", "exec"), importlib.util.module_from_spec(source).__dict__)


def test_an_unknown_action_is_an_error_never_a_kept_element(monkeypatch):
    """Before the table was checked, a code _apply did not know fell through its branches and kept
    the element (here Patient's Address, with C, clean)."""
    monkeypatch.setitem(deid.PROFILE, Tag("PatientAddress"), "C")
    ds = Dataset()
    ds.PatientAddress = "1 Canary Street"
    with pytest.raises(ValueError, match="unknown de-identification action 'C'"):
        deid.deidentify(ds, KEY)


def test_the_safety_net_covers_what_the_table_does_not_name():
    """An unnamed person name is emptied, UID replaced, date, time and free text removed, unknown
    VR removed; other VRs kept (the table names what must go)."""
    assert deid.SAFETY_NET == {"PN": "Z", "UI": "U", "DA": "X", "DT": "X", "TM": "X", "ST": "X",
                               "LT": "X", "UT": "X", "UN": "X"}
    values = {"PN": "Canary^Name", "UI": "1.2.826.0.1.3680043.8.498.5", "DA": "20240229",
              "TM": "101010", "DT": "20240229101010", "ST": "Canary", "LT": "Canary", "UT": "Canary",
              "LO": "KEPT", "CS": "KEPT"}
    ds = Dataset()
    unnamed = unnamed_tags()
    for vr, tags in unnamed.items():
        for tag in tags:
            assert tag not in deid.PROFILE
            ds.add_new(tag, vr, values[vr])
    ds.add_new(0x00709999, "UN", b"CANARYUN")
    out = deid.deidentify(ds, KEY)
    for vr, tags in unnamed.items():
        for tag in tags:
            if vr == "PN":
                assert out[tag].value in ("", None)
            elif vr == "UI":
                assert out[tag].value == deid.pseudonymize_uid(values["UI"], KEY)
            elif vr in ("LO", "CS"):
                assert out[tag].value == "KEPT"
            else:
                assert tag not in out, (vr, hex(tag))
    assert 0x00709999 not in out


def test_the_patient_is_known_by_id_else_name_and_birth_date_else_study():
    def ds(**kw) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    assert deid.patient_key_of(ds(PatientID=" P1 ", PatientName="A^B")) == "id:P1"
    assert deid.patient_key_of(ds(PatientName="A^B", PatientBirthDate="19610704")) == "name:A^B|19610704"
    assert deid.patient_key_of(ds(StudyInstanceUID="1.2.3")) == "study:1.2.3"
    # two anonymous studies are two patients, one study's files one
    a = deid.deidentify(ds(StudyInstanceUID="1.2.3"), KEY)
    b = deid.deidentify(ds(StudyInstanceUID="1.2.4"), KEY)
    c = deid.deidentify(ds(StudyInstanceUID="1.2.3"), KEY)
    assert a.PatientID == c.PatientID != b.PatientID


@pytest.mark.parametrize("value, sex", [("F", "F"), (" m ", "M"), ("O", "O"), ("X", None), ("", None)])
def test_patient_sex_is_one_of_m_f_o(value, sex):
    d = Dataset()
    d.PatientSex = value
    assert deid.patient_sex(d) == sex
    assert deid.patient_sex(Dataset()) is None


def test_the_key_file_must_hold_at_least_16_bytes_and_lives_in_a_private_folder(tmp_path, monkeypatch):
    import os
    import stat

    from medops.config import DeidConfig

    monkeypatch.delenv("MEDOPS_TEST_DEID", raising=False)
    cfg = DeidConfig(key_env="MEDOPS_TEST_DEID")
    deid.resolve_deid_key(cfg, state_dir=tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "secrets").st_mode) == 0o700
    (tmp_path / "secrets" / "deid.key").write_bytes(b"k" * 16)
    assert deid.resolve_deid_key(cfg, state_dir=tmp_path) == b"k" * 16
    (tmp_path / "secrets" / "deid.key").write_bytes(b"k" * 15)
    with pytest.raises(ValueError, match="holds 15 bytes; need >= 16"):
        deid.resolve_deid_key(cfg, state_dir=tmp_path)


def test_patient_name_and_id_are_the_pseudonym_even_when_the_original_had_none():
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    out = deid.deidentify(ds, KEY)
    pseudonym = deid.pseudonymize_patient("study:1.2.3", KEY)
    assert out.PatientID == str(out.PatientName) == pseudonym


def test_several_uids_in_one_element_are_replaced_one_by_one():
    """The instance UID replaced, the registered SOP class kept, in order; in memory and as read."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from medops.dicom.io import encode_file, read_dataset

    values = ["1.2.826.0.1.3680043.8.498.3333.7", "1.2.840.10008.5.1.4.1.1.1"]
    want = [deid.pseudonymize_uid(values[0], KEY), values[1]]
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = values
    assert list(deid.deidentify(ds, KEY).FailedSOPInstanceUIDList) == want
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = values
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.3333.1"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    stored = read_dataset(buf.getvalue(), require_pixels=False, parse_all=False)
    deid.deidentify(stored, KEY)
    out = pydicom.dcmread(io.BytesIO(encode_file(stored)))
    assert list(out.FailedSOPInstanceUIDList) == want
