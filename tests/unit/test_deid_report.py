"""deid_report: what de-identification did, attribute by attribute, counted; never a value."""

from __future__ import annotations

import io
import json
import shutil

import pydicom
import pytest
from test_deid import CANARIES, phi_dataset

from medops.cli import main
from medops.dicom import deid, deid_report
from medops.dicom.io import encode_file, read_dataset


def _roundtrip(ds) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _no_canary(text: str) -> None:
    for canary in CANARIES:
        assert canary.lower() not in text.lower(), canary


def test_a_pair_shows_what_was_removed_emptied_replaced_shifted_kept_and_added():
    key = b"unit-test-key-0123456789abcdef"
    original = _roundtrip(phi_dataset("1"))
    out = _roundtrip(deid.deidentify(_roundtrip(phi_dataset("1")), key, retain_longitudinal=True))
    counts = deid_report.compare_pair(original, out)
    assert counts["PatientAddress", "removed"] == 1
    assert counts["AccessionNumber", "emptied"] == 1
    assert counts["StudyInstanceUID", "replaced"] == 1 and counts["PatientID", "replaced"] == 1
    assert counts["StudyDate", "shifted"] == 1 and counts["ContentDate", "shifted"] == 1
    assert counts["Modality", "kept"] == 1 and counts["PatientSex", "kept"] == 1
    assert counts["PatientIdentityRemoved", "added"] == 1
    assert counts["private attributes (odd groups)", "removed"] == 3  # 2 + 1 in a sequence
    # a kept sequence is walked: the nested name emptied, the nested reference replaced
    assert counts["SourceImageSequence", "kept"] == 1
    assert counts["VerifyingObserverName", "emptied"] == 1
    assert counts["ReferencedSOPInstanceUID", "replaced"] == 1
    assert counts["ReferencedSOPClassUID", "kept"] == 1
    # with the dates removed instead
    plain = _roundtrip(deid.deidentify(_roundtrip(phi_dataset("1")), key))
    counts = deid_report.compare_pair(original, plain)
    assert counts["SeriesDate", "removed"] == 1 and counts["StudyDate", "emptied"] == 1
    assert ("StudyDate", "shifted") not in counts


def test_the_audit_of_a_de_identified_file_finds_what_is_left():
    key = b"unit-test-key-0123456789abcdef"
    clean = _roundtrip(deid.deidentify(phi_dataset("1"), key))
    assert deid_report.audit_deidentified(clean) == []
    assert deid_report.recorded_options(clean) == (
        "113100 (Basic Application Confidentiality Profile)",
        "113108 (Retain Patient Characteristics Option)")
    dirty = _roundtrip(deid.deidentify(phi_dataset("1"), key))
    dirty.PatientAddress = "1 Canary Street"
    dirty.AccessionNumber = "CANACC99"
    dirty.add_new(0x00291001, "LO", "CANARYPRIV")
    dirty.add_new(0x60003000, "OW", b"\x00\x01")
    dirty.OperatorsName = "Canaryoperator^Bob"
    dirty.SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.3333.0"
    dirty.StudyDate = "20240229"
    dirty.PatientIdentityRemoved = "NO"
    findings = deid_report.audit_deidentified(dirty)
    assert findings == sorted(findings, key=findings.index)  # one per problem, in data set order
    assert set(findings) == {
        "PatientIdentityRemoved is not YES",
        "AccessionNumber: not empty, the profile empties it",
        "StudyDate: not empty, the profile empties it",
        "OperatorsName: present, the profile removes it",
        "PatientAddress: present, the profile removes it",
        "SourceImageSequence[0].ReferencedSOPInstanceUID: a UID that is neither registered nor a 2.25 pseudonym",
        "private attributes (odd groups): present",
        "overlays (60xx,xxxx): present",
    }
    _no_canary("\n".join(findings))
    # the dates of a file de-identified with the longitudinal option are shifted, not findings
    shifted = _roundtrip(deid.deidentify(phi_dataset("1"), key, retain_longitudinal=True))
    assert shifted.StudyDate and deid_report.audit_deidentified(shifted) == []
    # without Retain Patient Characteristics, a kept sex is a finding; a name other than the
    # pseudonym too; and a file without the Basic Profile's code
    basic = _roundtrip(deid.deidentify(phi_dataset("1"), key, retain_characteristics=False))
    assert deid_report.audit_deidentified(basic) == []
    basic.PatientSex = "F"
    basic.PatientName = "Canaryname^Canarygiven"
    del basic.DeidentificationMethodCodeSequence
    assert set(deid_report.audit_deidentified(basic)) == {
        "PatientSex: not empty, the profile empties it",
        "PatientName: a person name other than the patient's pseudonym",
        "DeidentificationMethodCodeSequence does not list 113100 (Basic Profile)",
    }


@pytest.fixture
def exported(tmp_path, repo_root, deid_key):
    """An original export of 3 files and what ingest's de-identification writes for them."""
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    source, out = tmp_path / "export", tmp_path / "ingested" / "dicom"
    source.mkdir()
    for i in range(3):
        ds = phi_dataset(str(i))
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        (source / f"{i}.dcm").write_bytes(buf.getvalue())
        stored = read_dataset(buf.getvalue(), parse_all=False)  # as ingest reads it
        deid.deidentify(stored, deid_key)
        target = out / str(stored.StudyInstanceUID) / f"{stored.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_file(stored))
    (source / "notes.txt").write_text("not DICOM")
    return tmp_path, source, out


def test_deid_report_command_over_ingest_output(exported, capsys):
    project, source, out = exported
    assert main(["--project", str(project), "deid-report", str(out.parent), "--source", str(source)]) == 0
    text = capsys.readouterr().out
    assert "3 de-identified file(s); 3 compared with their original" in text
    assert "113100 (Basic Application Confidentiality Profile) + 113108" in text
    row = next(line.split() for line in text.splitlines() if line.startswith("PatientAddress "))
    assert row[1:] == ["3", "0", "0", "0", "0", "0"]  # removed in each of the 3 files
    assert "Findings: none" in text
    _no_canary(text)

    assert main(["--project", str(project), "deid-report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["files"] == 3 and data["compared_with_original"] == 0 and data["findings"] == {}
    assert data["method_codes"] == {"113100 (Basic Application Confidentiality Profile) + "
                                    "113108 (Retain Patient Characteristics Option)": 3}
    assert set(data["deviations"]) == set(deid.DEVIATIONS)

    # a file with something left: exit 1, the finding named, no value
    first = sorted(out.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.InstitutionName = "Canary General"
    ds.save_as(first, enforce_file_format=True)
    assert main(["--project", str(project), "deid-report", str(out)]) == 1
    text = capsys.readouterr().out
    assert "InstitutionName: present, the profile removes it (1 file(s))" in text
    _no_canary(text)


def test_deid_report_refuses_to_pair_without_the_key_and_needs_files(exported, capsys, monkeypatch):
    project, source, out = exported
    monkeypatch.delenv("MEDOPS_DEID_KEY")
    assert main(["--project", str(project), "deid-report", str(out), "--source", str(source)]) == 3
    assert "needs the de-identification key" in capsys.readouterr().err
    assert not (project / ".medops" / "secrets" / "deid.key").exists()  # none created
    assert main(["--project", str(project), "deid-report", str(source / "nothing")]) == 3
    assert "no DICOM files" in capsys.readouterr().err


def test_deid_report_reads_ingests_zip_packs(exported, capsys):
    """Ingest packs each shard's de-identified files into dicom/shard-NNNNN.zip."""
    import zipfile

    project, source, out = exported
    packed = project / "packed" / "dicom"
    packed.mkdir(parents=True)
    with zipfile.ZipFile(packed / "shard-00000.zip", "w") as pack:
        for path in sorted(out.rglob("*.dcm")):
            pack.write(path, path.relative_to(out).as_posix())
    assert main(["--project", str(project), "deid-report", str(packed.parent), "--source", str(source),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["files"], data["compared_with_original"], data["unmatched"]) == (3, 3, 0)
    assert data["attributes"]["PatientAddress"] == {"removed": 3}


def test_unreadable_files_are_counted_never_skipped_or_fatal(exported, capsys):
    project, source, out = exported
    # an original cut short in transfer (ingest quarantined it), and the fuzzer's panicking file
    data = (source / "0.dcm").read_bytes()
    (source / "cut.dcm").write_bytes(data[:100])  # inside the preamble: no DICOM left
    shutil.copy(pydicom_file_path("rle_panic"), source / "rle.dcm")
    assert main(["--project", str(project), "deid-report", str(out.parent), "--source", str(source),
                 "--json"]) == 0
    data_out = json.loads(capsys.readouterr().out)
    assert data_out["compared_with_original"] == 3
    # notes.txt and the cut original do not parse; the RLE file parses (pixels are not decoded)
    # but has no de-identified twin
    assert data_out["unreadable_originals"] == 2 and data_out["unmatched"] == 1
    # a de-identified file that no longer parses is a finding: counted, exit 1
    first = sorted(out.rglob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:200])
    assert main(["--project", str(project), "deid-report", str(out)]) == 1
    text = capsys.readouterr().out
    assert "2 de-identified file(s)" in text
    assert "FINDING: 1 de-identified file(s) could not be read and were not audited" in text


def pydicom_file_path(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "data" / "fuzz" / f"{name}.dcm"
