"""What PS3.15 Table E.1-1 prescribes, worked out here independently of medops.dicom.deid, and a
data set that holds every attribute the table names, each with its own canary.

Test helper, not a fixture module: import it as ``from _deid_standard import ...`` from a test in
tests/unit (pytest puts a test file's folder on sys.path).

The expected action of an attribute comes from the vendored table (medops.dicom.table_e1_1) and
the choices and deviations written out below; deid.py's own CHOICES / DEVIATIONS / ADDITIONS are
compared with these copies, so a change on either side fails a test.
"""

from __future__ import annotations

import datetime as dt

from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from medops.dicom.table_e1_1 import ROWS

# where the table offers a choice, the one medops takes (see deid.CHOICES for the reasons)
CHOICE = {"X": "X", "Z": "Z", "U": "U", "D": "X", "X/Z": "X", "X/D": "X", "X/Z/D": "X",
          "Z/D": "Z", "X/Z/U*": "K"}
# every way medops' action differs from CHOICE and the options it applies (reasons: deid.DEVIATIONS)
DEVIATIONS = {"PatientName": "D", "PatientID": "D", "PersonName": "Z",
              "VerifyingObserverName": "Z", "EthnicGroup": "X", "SmokingStatus": "X",
              "PregnancyStatus": "X"}
# attributes the table does not name that medops handles explicitly
ADDITIONS = {
    "IssuerOfPatientIDQualifiersSequence": "X", "ResponsiblePersonRole": "X",
    "PatientAlternativeCalendar": "X", "PatientBirthDateInAlternativeCalendar": "X",
    "PatientDeathDateInAlternativeCalendar": "X", "EvaluatorName": "X",
    "AnnotationContentSequence": "X", "EncryptedAttributesSequence": "X",
    "MACParametersSequence": "X", "ModifyingDeviceManufacturer": "X",
    "AcquisitionDeviceProcessingCode": "X", "ScheduledProcedureStepSequence": "X",
    "ConfidentialityCode": "X", "ReferencedRequestSequence": "X",
    "AlternateContainerIdentifierSequence": "X", "CreatorVersionUID": "U",
    "PatientIdentityRemoved": "K", "DeidentificationMethod": "K",
    "DeidentificationMethodCodeSequence": "K", "LongitudinalTemporalInformationModified": "K",
}
# written afresh by deidentify at the top level, whatever the source held
RECORD = {"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
          "LongitudinalTemporalInformationModified", "PatientID", "PatientName", "PatientAge"}
# the safety net for attributes nobody names, by VR
NET = {"PN": "Z", "UI": "U", "DA": "X", "DT": "X", "TM": "X", "ST": "X", "LT": "X", "UT": "X",
       "UN": "X"}


def expected_table(*, characteristics: bool) -> dict[int, str]:
    """tag -> the action PS3.15 prescribes, as medops resolves its choices and options."""
    table = {}
    for row in ROWS:
        if row.value is None:
            continue
        action = CHOICE[row.basic]
        if characteristics and row.options.get("characteristics") == "K":
            action = "K"
        table[row.value] = action
    for keyword, action in {**DEVIATIONS, **ADDITIONS}.items():
        table[int(tag_for_keyword(keyword))] = action
    return table


def vr_of(tag: int) -> str:
    """The VR a test element gets: the dictionary's (its first choice), LO for a tag this pydicom
    does not know (read back as UN from an implicit-VR file)."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "LO"


def unnamed_tags() -> dict[str, list[int]]:
    """Per VR of the safety net (and LO, CS: kept), two public attributes of the data dictionary
    that neither the table nor medops names (in data-dictionary order, so always the same)."""
    named = set(expected_table(characteristics=True))
    found: dict[str, list[int]] = {vr: [] for vr in [*NET, "LO", "CS"] if vr != "UN"}
    for tag, (vr, vm, name, retired, keyword) in sorted(DicomDictionary.items()):
        group = tag >> 16
        if tag in named or retired or group in (0, 2, 4, 6) or group & 1 or group >= 0x5000 \
                or not keyword or tag & 0xFFFF == 0 or keyword == "SpecificCharacterSet":
            continue
        if vr in found and len(found[vr]) < 2:
            found[vr].append(tag)
    return found


# File Meta Information (PS3.10 7.1) that names sites; deidentify removes it
META_REMOVED = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
                "SendingPresentationAddress", "ReceivingPresentationAddress",
                "PrivateInformationCreatorUID", "PrivateInformation")
UNKNOWN_PUBLIC = 0x00709999  # a public tag no dictionary knows: read as UN, removed by the net
DATE_BASE = dt.date(2001, 1, 1)


class Canaries:
    """One canary value per element, by VR; ``searchable`` are those long and odd enough to look
    for in a file's bytes."""

    def __init__(self) -> None:
        self.n = 0
        self.searchable: list[str] = []

    def value(self, vr: str) -> object:
        self.n += 1
        i = self.n
        text = {
            "AE": f"CNRYAE{i:05d}", "CS": f"CNRYCS{i:05d}", "SH": f"CnrySH{i:05d}",
            "LO": f"CnryLO{i:05d}", "LT": f"CnryLT{i:05d} text", "ST": f"CnryST{i:05d} text",
            "UT": f"CnryUT{i:05d} text", "UC": f"CnryUC{i:05d}", "UR": f"http://cnry{i:05d}.test",
            "PN": f"Cnry{i:05d}^Given", "UI": f"1.2.826.0.1.3680043.8.498.77.{i}",
            "DA": (DATE_BASE + dt.timedelta(days=i)).strftime("%Y%m%d"),
            "TM": f"101010.{i:06d}",
        }.get(vr)
        if vr == "DT":
            text = (DATE_BASE + dt.timedelta(days=i)).strftime("%Y%m%d") + "101010"
        if text is not None:
            self.searchable.append(text)
            return text
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            data = f"CNRYB{i:05d}".encode()[:8] + f"{i:08d}".encode()
            self.searchable.append(data.decode())
            return data
        if vr == "AS":
            return f"{i % 100:03d}Y"
        if vr in ("DS", "IS"):
            return str(i)
        if vr in ("FL", "FD"):
            return float(i)
        if vr == "AT":
            return 0x00100010
        return i  # US, SS, UL, SL, UV, SV


def _element_value(ds: Dataset, tag: int, vr: str, canaries: Canaries, depth: int) -> None:
    if vr == "SQ":
        item = Dataset()
        # an item that names identifying things: whatever keeps the sequence must clean it
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        item.ReferencedSOPInstanceUID = canaries.value("UI")
        item.add_new(0x0040A123, "PN", canaries.value("PN"))  # Person Name
        item.add_new(0x00080104, "LO", canaries.value("LO"))  # Code Meaning: not named, kept
        ds.add_new(tag, "SQ", Sequence([item]))
        return
    ds.add_new(tag, vr, canaries.value(vr))


def fill(ds: Dataset, canaries: Canaries, *, depth: int = 0) -> None:
    """Every attribute the table names (and medops' additions), the unnamed ones, a private
    block, overlays and curves, each with its own canary; at depth 0 also a walked sequence
    whose item holds all of it again."""
    for tag in sorted(expected_table(characteristics=True)):
        if tag >> 16 in (0x0000, 0x0002, 0x0004):  # command, file meta, DICOMDIR: not in a data set
            continue
        _element_value(ds, tag, vr_of(tag), canaries, depth)
    for vr, tags in unnamed_tags().items():
        for tag in tags:
            _element_value(ds, tag, vr, canaries, depth)
    ds.add_new(UNKNOWN_PUBLIC, "UN", canaries.value("UN"))
    ds.add_new(0x00290010, "LO", "CNRY VENDOR BLOCK")
    ds.add_new(0x00291001, "LO", canaries.value("LO"))
    ds.add_new(0x00291002, "SQ", Sequence([Dataset()]))
    ds[0x00291002].value[0].add_new(0x00100010, "PN", canaries.value("PN"))
    ds.add_new(0x60000010, "US", 2)                       # overlay rows
    ds.add_new(0x60003000, "OW", canaries.value("OW"))    # overlay data
    ds.add_new(0x60FE4000, "LT", canaries.value("LT"))    # overlay comments, last overlay group
    ds.add_new(0x50003000, "OB", canaries.value("OB"))    # curve data
    ds.add_new(0x50FE0005, "US", 1)                       # curve dimensions, last curve group
    if depth == 0:
        item = Dataset()
        fill(item, canaries, depth=1)
        ds.add_new(0x00089215, "SQ", Sequence([item]))   # Derivation Code Sequence: not named, walked


def everything_dataset(patient_id: str = "CNRY-PID-0001") -> tuple[Dataset, list[str]]:
    """The data set and its searchable canaries (see the module docstring)."""
    canaries = Canaries()
    ds = Dataset()
    fill(ds, canaries)
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610704"
    ds.StudyDate = "20240229"
    ds.PatientAge = "062Y"
    ds.PatientSex = "F"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes([0, 1, 2, 3])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for i, name in enumerate(META_REMOVED):
        vr = "UI" if name == "PrivateInformationCreatorUID" else "OB" if name == "PrivateInformation" \
            else "UR" if "Address" in name else "AE"
        value = {"UI": f"1.2.826.0.1.3680043.8.498.66.{i}", "OB": b"CNRYMETAPRIVATE!",
                 "UR": f"http://cnry-meta-{i}.test", "AE": f"CNRYMETAAE{i:02d}"}[vr]
        setattr(ds.file_meta, name, value)
        canaries.searchable.append(value.decode() if isinstance(value, bytes) else value)
    # several UIDs in one element: each replaced, a registered one kept
    ds.FailedSOPInstanceUIDList = [canaries.value("UI"), "1.2.840.10008.5.1.4.1.1.1"]
    return ds, [*canaries.searchable, patient_id, "19610704", "CNRY VENDOR BLOCK"]


def keyword(tag: int) -> str:
    return keyword_for_tag(tag) or str(Tag(tag))
