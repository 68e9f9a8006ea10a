"""deid against PS3.15 Table E.1-1, element by element.

A data set holding every attribute the table names (and the unnamed kinds the safety net covers,
private, overlay and curve elements, at the top level and again inside a sequence item), each
with its own canary, goes the way ingest sends a file: written, read back as stored
(``read_dataset(parse_all=False)``), de-identified, encoded by ``encode_file``. Then each element
is checked against the action the standard prescribes (tests/unit/_deid_standard.py works it out
from the vendored table, not from deid.py) and the written bytes are searched for every canary
that is not one of a kept element.
"""

from __future__ import annotations

import datetime as dt
import functools
import io

import pydicom
import pytest
from _deid_standard import META_REMOVED, NET, RECORD, everything_dataset, expected_table, keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medops.dicom import deid
from medops.dicom.io import elements, encode_file, read_dataset

KEY = b"unit-test-key-0123456789abcdef"
OPTION_SETS = [
    pytest.param(dict(retain_longitudinal=False, retain_characteristics=True), id="default"),
    pytest.param(dict(retain_longitudinal=True, retain_characteristics=True), id="longitudinal"),
    pytest.param(dict(retain_longitudinal=False, retain_characteristics=False), id="basic-only"),
    pytest.param(dict(retain_longitudinal=True, retain_characteristics=False), id="longitudinal-only"),
]
TEXT_VRS = {"UI", "LO", "PN", "CS", "DA", "DT", "SH", "AS", "TM"}
CODES = {"basic": "113100", "characteristics": "113108", "longitudinal": "113107"}


def _patient_id(n_canaries: int) -> str:
    """A patient whose date shift moves every canary date (one day apart, one per canary) before
    the first one, so that no shifted date equals another element's original (the byte search
    stays exact)."""
    for n in range(1000):
        pid = f"CNRY-PID-{n:04d}"
        if deid.date_shift_days("id:" + pid, KEY) < -(n_canaries + 2):
            return pid
    raise AssertionError("no patient id with a long enough shift")


@functools.lru_cache(maxsize=None)
def _source(transfer_syntax: str) -> tuple[bytes, tuple[str, ...], str]:
    """The everything data set as a file in ``transfer_syntax``, its canaries and its patient
    (built once: the mutation run repeats these tests for every mutant)."""
    probe, _ = everything_dataset()
    pid = _patient_id(sum(1 for _ in probe.iterall()))  # at least one canary per element
    ds, canaries = everything_dataset(pid)
    return _written(ds, transfer_syntax), tuple(canaries), pid


def _written(ds: Dataset, transfer_syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _through_ingest(data: bytes, **options) -> bytes:
    stored = read_dataset(data, parse_all=False)
    parsed = {tag for tag, elem in elements(stored).items() if not elem.is_raw}  # by pydicom itself
    deid.deidentify(stored, KEY, **options)
    # what deid wrote is stored encoded, as read, so that encode_file copies it without parsing
    # (ingest's speed): in an explicit-VR file every top-level text element is still raw (pydicom
    # itself parses a few others, e.g. Pixel Representation when it reads a sequence; an implicit
    # VR value is parsed to be read), and a raw value has an even length (PS3.5 7.1.1), padded
    # with NUL for a UID and a space otherwise
    explicit = not stored.original_encoding[0]
    codes = elements(stored)[0x00120064]  # De-identification Method Code Sequence, stored encoded
    assert codes.is_raw and codes.VR == ("SQ" if explicit else None)
    for tag, elem in elements(stored).items():
        if tag in parsed or (elem.VR or deid._dictionary_vr(tag)) not in TEXT_VRS:
            continue
        assert elem.is_raw or not explicit, elem
        if elem.is_raw:  # in the file's own encoding, or encode_file would parse it again
            assert (elem.is_implicit_VR, elem.is_little_endian) == tuple(stored.original_encoding), elem
        if elem.is_raw and elem.value:
            assert len(elem.value) % 2 == 0, elem
            vr = elem.VR or deid._dictionary_vr(tag)
            assert elem.value[-1:] != (b" " if vr == "UI" else b"\x00"), elem
    return encode_file(stored)


def _empty(elem) -> bool:
    return elem.value in (None, "", b"") or (isinstance(elem.value, Sequence) and len(elem.value) == 0)


def _shifted(value: str, days: int) -> str:
    day = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    return day.strftime("%Y%m%d") + value[8:]


class Checker:
    """Walks an original data set and its de-identified copy side by side."""

    def __init__(self, table: dict[int, str], shift: int | None, pseudonym: str) -> None:
        self.table, self.shift, self.pseudonym = table, shift, pseudonym
        self.problems: list[str] = []
        self.kept: set[str] = set()   # canary values that rightly survive (kept elements)
        self.seen: dict[str, int] = {}

    def fail(self, path: str, what: str) -> None:
        self.problems.append(f"{path}: {what}")

    def level(self, orig: Dataset, out: Dataset, path: str, *, top: bool) -> None:
        for elem in orig:
            tag, vr = int(elem.tag), elem.VR
            name = f"{path}{keyword(tag)}"
            group = tag >> 16
            got = out.get(tag)
            if group & 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
                self.count("removed (group)")
                if got is not None:
                    self.fail(name, "private, curve or overlay element kept")
                continue
            if top and keyword(tag) in RECORD:
                continue  # written afresh: test_the_record_is_written_afresh
            action = self.table.get(tag) or NET.get(vr, "K")
            if self.shift is not None and vr in ("DA", "DT") and action in ("X", "Z") \
                    and keyword(tag) != "PatientBirthDate":
                self.count("shifted")
                if got is None or got.value != _shifted(elem.value, self.shift):
                    self.fail(name, f"not shifted by {self.shift} days: {got!r}")
            elif action == "X":
                self.count("removed")
                if got is not None:
                    self.fail(name, f"X but present: {got!r}")
            elif action == "Z":
                self.count("emptied")
                if got is None or not _empty(got):
                    self.fail(name, f"Z but {'absent' if got is None else 'not empty'}")
            elif action == "D":
                self.count("pseudonym")
                if got is None or str(got.value) != self.pseudonym:
                    self.fail(name, f"D but not the pseudonym: {got!r}")
            elif action == "U":
                self.count("replaced")
                values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
                want = [v if v in UID_dictionary else deid.pseudonymize_uid(v, KEY) for v in values]
                have = None if got is None else [got.value] if isinstance(got.value, str) else list(got.value)
                if have != want or not all(w.startswith(("2.25.", "1.2.840.10008.")) for w in want):
                    self.fail(name, f"U but {got!r}, not {want}")
            elif action == "K" and vr == "SQ":
                self.count("walked")
                if got is None or len(got.value) != len(elem.value):
                    self.fail(name, "kept sequence lost its items")
                    continue
                for i, (a, b) in enumerate(zip(elem.value, got.value)):
                    self.level(a, b, f"{name}[{i}].", top=False)
            elif action == "K":
                self.count("kept")
                if got is None or got.value != elem.value:
                    self.fail(name, f"K but {got!r}")
                if isinstance(elem.value, (str, bytes)):
                    self.kept.add(elem.value.decode() if isinstance(elem.value, bytes) else elem.value)
            else:
                self.fail(name, f"the oracle has no action {action!r}")
        extra = {int(t) for t in out.keys()} - {int(t) for t in orig.keys()}
        if top:
            extra -= {int(deid._tag(k)) for k in RECORD}
        if extra:
            self.fail(path or "top level", f"elements that were not in the original: {sorted(extra)}")

    def count(self, what: str) -> None:
        self.seen[what] = self.seen.get(what, 0) + 1


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit", "implicit"])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_every_element_gets_the_action_the_standard_prescribes(options, transfer_syntax):
    source, canaries, pid = _source(transfer_syntax)
    # the original as built (an explicit-VR file keeps each element's VR, known or not)
    original = pydicom.dcmread(io.BytesIO(_source(ExplicitVRLittleEndian)[0]))
    data = _through_ingest(source, **options)
    out = pydicom.dcmread(io.BytesIO(data))

    shift = deid.date_shift_days("id:" + pid, KEY) if options["retain_longitudinal"] else None
    if shift is not None:  # E.3.6 as medops implements it: 1 to 3,650 days into the past
        assert -3650 <= shift <= -1
    table = expected_table(characteristics=options["retain_characteristics"])
    checker = Checker(table, shift, deid.pseudonymize_patient("id:" + pid, KEY))
    checker.level(original, out, "", top=True)
    assert not checker.problems, "\n".join(checker.problems[:40])
    # the data set exercised every kind of action, top level and nested
    kinds = {"removed", "emptied", "pseudonym", "replaced", "walked", "kept", "removed (group)"}
    assert kinds <= set(checker.seen), checker.seen
    assert ("shifted" in checker.seen) == options["retain_longitudinal"]
    assert checker.seen["removed"] > 500

    lowered = data.lower()
    survivors = [c for c in canaries if c not in checker.kept and c.lower().encode() in lowered]
    assert not survivors, survivors[:20]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_the_record_is_written_afresh_and_lists_exactly_the_options_applied(options):
    source, _, pid = _source(ExplicitVRLittleEndian)
    data = _through_ingest(source, **options)
    out = pydicom.dcmread(io.BytesIO(data))
    # the code sequence's items are in the file's encoding: explicit VR (Code Value, SH)
    assert b"\x08\x00\x00\x01SH\x06\x00113100" in data
    pseudonym = deid.pseudonymize_patient("id:" + pid, KEY)
    assert out.PatientID == str(out.PatientName) == pseudonym
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == deid.METHOD
    codes = [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
             for c in out.DeidentificationMethodCodeSequence]
    want = ["basic"] + [name for name, on in (("characteristics", options["retain_characteristics"]),
                                              ("longitudinal", options["retain_longitudinal"])) if on]
    assert [c[0] for c in codes] == [CODES[n] for n in want]
    meanings = {"basic": "Basic Application Confidentiality Profile",  # PS3.16 CID 7050
                "characteristics": "Retain Patient Characteristics Option",
                "longitudinal": "Retain Longitudinal Temporal Information Modified Dates Option"}
    assert codes == [(CODES[n], "DCM", meanings[n]) for n in want]
    assert out.LongitudinalTemporalInformationModified == (
        "MODIFIED" if options["retain_longitudinal"] else "REMOVED")
    if options["retain_characteristics"]:
        # E.3.7: kept, the age recomputed from the original header
        assert (out.PatientSex, out.PatientAge) == ("F", "062Y")
        assert "PatientSize" in out and "PatientWeight" in out and out.PatientSexNeutered
    else:
        # the Basic Profile: Patient's Sex Z, Age, Size, Weight X, Sex Neutered X/Z
        assert out.PatientSex == ""
        assert not {"PatientAge", "PatientSize", "PatientWeight", "PatientSexNeutered"} & set(out.dir())
    # PS3.10 7.1: the File Meta Information names the sending and receiving sites
    assert not set(META_REMOVED) & set(out.file_meta.dir())
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationClassUID == "2.25.164379224683301542405627311478395741114"
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and out.Modality == "CR"
    assert out.pixel_array.tolist() == [[0, 1], [2, 3]]


def test_dates_move_into_the_past_by_the_patients_own_offset():
    """E.3.6: one patient's dates move by the same number of days, whichever element holds them;
    another patient's by another; the direction is into the past, by 1 to 3,650 days."""
    shifts = {deid.date_shift_days(f"id:P{i}", KEY) for i in range(200)}
    assert all(-3650 <= s <= -1 for s in shifts) and len(shifts) > 150
    assert min(shifts) < -3000 and max(shifts) > -700  # spread over the range, not clustered
    ds = Dataset()
    ds.PatientID = "P1"
    ds.StudyDate, ds.AcquisitionDateTime, ds.SeriesDate = "20240229", "20240301093000.5+0100", "20240228"
    out = deid.deidentify(ds, KEY, retain_longitudinal=True)
    days = deid.date_shift_days("id:P1", KEY)
    assert out.StudyDate == _shifted("20240229", days) and out.SeriesDate == _shifted("20240228", days)
    assert out.AcquisitionDateTime == _shifted("20240301093000.5+0100", days)


@pytest.mark.parametrize("value", ["2024-02-29", "2024022", "20241301", "", "2024\\20240301",
                                   "00010101"])
def test_a_date_that_cannot_be_shifted_is_removed_not_kept(value):
    """Not one date of the form YYYYMMDD (PS3.5 6.2), several dates, or one that would fall
    before year 1: the basic action applies (Series Date: removed)."""
    ds = Dataset()
    ds.PatientID = "P1"
    ds.add_new(0x00080021, "DA", value)  # Series Date, X
    out = deid.deidentify(ds, KEY, retain_longitudinal=True)
    assert "SeriesDate" not in out


def test_a_shifted_date_keeps_four_year_digits():
    ds = Dataset()
    ds.PatientID = "P1"
    days = deid.date_shift_days("id:P1", KEY)
    early = (dt.date(1, 1, 1) - dt.timedelta(days=days)).strftime("%Y%m%d")
    ds.StudyDate = early.rjust(8, "0")
    out = deid.deidentify(ds, KEY, retain_longitudinal=True)
    assert out.StudyDate == "00010101"


@pytest.mark.parametrize("group, removed", [
    (0x4FFE, False), (0x5000, True), (0x50FE, True), (0x5100, False),
    (0x5FFE, False), (0x6000, True), (0x60FE, True), (0x6100, False),
])
def test_curve_and_overlay_groups_are_removed_to_their_exact_bounds(group, removed):
    """Curves 50xx and overlays 60xx (Table E.1-1: X): the whole group, and no more (an even group
    next to them is public, and an unnamed LO element in it is kept)."""
    ds = Dataset()
    ds.add_new((group << 16) | 0x0010, "LO", "SOMETHING")
    out = deid.deidentify(ds, KEY)
    assert ((group << 16) | 0x0010 not in out) == removed
