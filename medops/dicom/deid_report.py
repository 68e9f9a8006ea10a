"""The de-identification report a privacy officer reads: what happened to each attribute, counted,
with the profile, the options and the method codes used; never a value from a header.

Two sources, one report (:class:`DeidReport`):

- :func:`compare_pair` of an original and its de-identified file (what was removed, emptied,
  replaced, shifted or kept, attribute by attribute, sequences included): only the two files
  together show what was removed.
- :func:`audit_deidentified` of a de-identified file alone: the options it records
  (De-identification Method Code Sequence, PS3.15 E.1.1 / PS3.16 CID 7050) and a residual check,
  against medops' action table for those options (:data:`medops.dicom.deid.PROFILE`): an
  attribute the profile removes that is still there, a non-empty attribute it empties, a private,
  curve or overlay element, a UID that is neither registered nor a ``2.25.`` pseudonym, a person
  name other than the pseudonym. Each is a finding; findings name attributes, never values.

:func:`report_folder` reads every file below the ingest output's ``dicom/`` folder (and inside the
zip packs ingest writes there, one per shard) and, given the original export and the key, pairs each original with its de-identified file through the keyed
SOP Instance UID (the pairing ingest itself makes).

numpy and pydicom only, like the rest of medops.dicom.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from medops.dicom import deid

OUTCOMES = ("removed", "emptied", "replaced", "shifted", "kept", "added")
_OPTION_BY_CODE = {code: name for name, (code, _) in deid.PROFILE_CODES.items()}


def attribute_name(tag: int) -> str:
    """The name an attribute is counted under: its keyword; private, curve and overlay elements
    and tags the dictionary does not know by their group (a private tag's element number can
    hint at a vendor's meaning, and is not needed to count it)."""
    group = tag >> 16
    if group & 1:
        return "private attributes (odd groups)"
    if 0x5000 <= group <= 0x50FF:
        return "curves (50xx,xxxx)"
    if 0x6000 <= group <= 0x60FF:
        return "overlays (60xx,xxxx)"
    return keyword_for_tag(tag) or f"({group:04X},{tag & 0xFFFF:04X})"


def _empty(value: object) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)  # type: ignore[arg-type]


def _is_date(value: object) -> bool:
    return isinstance(value, str) and deid._parse_da(value) is not None


def compare_pair(original: Dataset, deidentified: Dataset) -> Counter[tuple[str, str]]:
    """(attribute, outcome) counts for one file: each element of ``original`` (recursively,
    through sequences kept in ``deidentified``) is removed, emptied, replaced, shifted (a date
    moved) or kept; elements only ``deidentified`` has are added."""
    counts: Counter[tuple[str, str]] = Counter()
    _compare_level(original, deidentified, counts)
    return counts


def _compare_level(original: Dataset, deidentified: Dataset, counts: Counter) -> None:
    for elem in original:
        name = attribute_name(int(elem.tag))
        if elem.tag not in deidentified:
            counts[name, "removed"] += 1
            continue
        after = deidentified[elem.tag]
        if elem.VR == "SQ" and after.VR == "SQ" and not _empty(after.value):
            if len(after.value) != len(elem.value):
                counts[name, "replaced"] += 1
                continue
            counts[name, "kept"] += 1
            for a, b in zip(elem.value, after.value):
                _compare_level(a, b, counts)
        elif _empty(after.value) and not _empty(elem.value):
            counts[name, "emptied"] += 1
        elif after.value == elem.value:
            counts[name, "kept"] += 1
        elif elem.VR in ("DA", "DT") and _is_date(elem.value) and _is_date(after.value):
            counts[name, "shifted"] += 1
        else:
            counts[name, "replaced"] += 1
    for tag in set(deidentified.keys()) - set(original.keys()):
        counts[attribute_name(int(tag)), "added"] += 1


def recorded_options(ds: Dataset) -> tuple[str, ...]:
    """The method codes a de-identified file lists (De-identification Method Code Sequence), in
    order, as ``CODE (meaning)`` for the codes medops writes and the bare code otherwise."""
    out = []
    for item in ds.get("DeidentificationMethodCodeSequence", None) or []:
        code = str(item.get("CodeValue", "") or "")
        name = _OPTION_BY_CODE.get(code)
        out.append(f"{code} ({deid.PROFILE_CODES[name][1]})" if name else code)
    return tuple(out)


def audit_deidentified(ds: Dataset) -> list[str]:
    """Residual-risk findings for one de-identified file (see the module docstring); empty when
    nothing is left that its recorded profile and options remove."""
    codes = {str(item.get("CodeValue", "")) for item in ds.get("DeidentificationMethodCodeSequence", None) or []}
    findings = []
    if str(ds.get("PatientIdentityRemoved", "")) != "YES":
        findings.append("PatientIdentityRemoved is not YES")
    if deid.PROFILE_CODES["basic"][0] not in codes:
        findings.append("DeidentificationMethodCodeSequence does not list 113100 (Basic Profile)")
    table = deid.PROFILE if deid.PROFILE_CODES["characteristics"][0] in codes else deid.BASIC_PROFILE
    dates_kept = deid.PROFILE_CODES["longitudinal"][0] in codes
    pseudonym = str(ds.get("PatientID", "") or "")
    _audit_level(ds, table, dates_kept, pseudonym, "", findings)
    return findings


def _audit_level(ds: Dataset, table: dict, dates_kept: bool, pseudonym: str, path: str,
                 findings: list[str]) -> None:
    for elem in ds:
        tag = int(elem.tag)
        group = tag >> 16
        name = path + attribute_name(tag)
        if group & 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            findings.append(f"{name}: present")
            continue
        vr = elem.VR
        action = table.get(elem.tag) or deid.SAFETY_NET.get(vr, "K")
        shifted = dates_kept and vr in ("DA", "DT") and elem.tag != deid._BIRTH_DATE
        if action == "X" and not shifted:
            findings.append(f"{name}: present, the profile removes it")
        elif action == "Z" and not shifted and not _empty(elem.value):
            findings.append(f"{name}: not empty, the profile empties it")
        elif vr == "PN" and not _empty(elem.value) and str(elem.value) != pseudonym:
            findings.append(f"{name}: a person name other than the patient's pseudonym")
        elif vr == "UI" and not _empty(elem.value):
            values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
            if any(not (str(v) in UID_dictionary or str(v).startswith("2.25.")) for v in values):
                findings.append(f"{name}: a UID that is neither registered nor a 2.25 pseudonym")
        elif vr == "SQ":
            for i, item in enumerate(elem.value):
                _audit_level(item, table, dates_kept, pseudonym, f"{name}[{i}].", findings)


@dataclass
class DeidReport:
    """Counts only: files, options recorded, (attribute, outcome) counts, findings."""

    files: int = 0
    compared: int = 0                                        # files read with their original
    unmatched: int = 0                                       # originals without a de-identified file
    unreadable_outputs: int = 0                              # de-identified files that do not parse
    unreadable_originals: int = 0                            # originals that do not parse (ingest
                                                             # quarantined them: nothing to compare)
    methods: Counter[str] = field(default_factory=Counter)   # DeidentificationMethod values
    options: Counter[tuple[str, ...]] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)  # finding -> number of files

    def add_deidentified(self, ds: Dataset) -> None:
        # everything read first: a value that fails to parse leaves no partial counts
        method = str(ds.get("DeidentificationMethod", "") or "(none)")
        options, findings = recorded_options(ds), set(audit_deidentified(ds))
        self.files += 1
        self.methods[method] += 1
        self.options[options] += 1
        for finding in findings:
            self.findings[finding] += 1

    def add_pair(self, original: Dataset, deidentified: Dataset) -> None:
        outcomes = compare_pair(original, deidentified)
        self.compared += 1
        self.outcomes.update(outcomes)

    def to_dict(self) -> dict:
        by_attribute: dict[str, dict[str, int]] = {}
        for (name, outcome), n in sorted(self.outcomes.items()):
            by_attribute.setdefault(name, {})[outcome] = n
        return {
            "files": self.files, "compared_with_original": self.compared, "unmatched": self.unmatched,
            "unreadable_outputs": self.unreadable_outputs, "unreadable_originals": self.unreadable_originals,
            "profile": "PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "table": f"PS3.15 Table E.1-1, {deid.table_e1_1.EDITION} edition",
            "methods": dict(self.methods),
            "method_codes": {" + ".join(k) or "(none)": v for k, v in self.options.items()},
            "attributes": by_attribute,
            "totals": {o: sum(n for (_, out), n in self.outcomes.items() if out == o) for o in OUTCOMES},
            "deviations": {k: reason for k, (_, reason) in deid.DEVIATIONS.items()},
            "findings": dict(self.findings),
        }


def format_report(report: DeidReport) -> str:
    """The report as text: header, method codes, the attribute table, findings."""
    d = report.to_dict()
    lines = [f"De-identification report: {d['files']} de-identified file(s); "
             f"{d['compared_with_original']} compared with their original"
             + (f", {d['unmatched']} original(s) without a de-identified file" if d["unmatched"] else "")
             + (f", {d['unreadable_originals']} original(s) unreadable" if d["unreadable_originals"] else ""),
             f"Profile: {d['profile']} ({d['table']})"]
    for method, n in d["methods"].items():
        lines.append(f"Method: {method} ({n} file(s))")
    for codes, n in d["method_codes"].items():
        lines.append(f"Method codes: {codes} ({n} file(s))")
    if d["attributes"]:
        width = max(len(k) for k in d["attributes"])
        lines += ["", f"{'attribute':{width}s} " + " ".join(f"{o:>8s}" for o in OUTCOMES)]
        for name, counts in d["attributes"].items():
            lines.append(f"{name:{width}s} " + " ".join(f"{counts.get(o, 0):8d}" for o in OUTCOMES))
        lines.append(f"{'total':{width}s} " + " ".join(f"{d['totals'][o]:8d}" for o in OUTCOMES))
    lines += ["", "Where medops differs from the table's action (deid.DEVIATIONS):"]
    lines += [f"  {k}: {reason}" for k, reason in d["deviations"].items()]
    lines.append("")
    if d["unreadable_outputs"]:
        lines.append(f"FINDING: {d['unreadable_outputs']} de-identified file(s) could not be read and were "
                     f"not audited")
    if d["findings"]:
        lines.append(f"FINDINGS ({sum(d['findings'].values())}):")
        lines += [f"  {finding} ({n} file(s))" for finding, n in sorted(d["findings"].items())]
    else:
        lines.append("Findings: none (nothing left that the recorded profile and options remove)")
    return "\n".join(lines)


def _files(folder: Path) -> Iterable[bytes]:
    """The bytes of every file below ``folder``, and of every member of a zip below it (ingest
    packs each shard's de-identified files into ``dicom/shard-NNNNN.zip``)."""
    import zipfile

    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix == ".zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as pack:
                for name in sorted(pack.namelist()):
                    if not name.endswith("/"):
                        yield pack.read(name)
        else:
            yield path.read_bytes()


def report_folder(deidentified: Path, *, source: Path | None = None, key: bytes | None = None) -> DeidReport:
    """The report over every file below ``deidentified`` (ingest's output folder, whose
    ``dicom/`` holds the de-identified files, one zip per shard, or that folder itself); with ``source`` (the
    original export) and ``key``, each original is paired with its de-identified file through
    ``pseudonymize_uid(original SOP Instance UID, key)`` and compared.

    Nothing is skipped silently: a de-identified file that cannot be read (or whose values cannot
    be, when audited) is counted as ``unreadable_outputs``, a finding; an original that cannot be
    read is counted as ``unreadable_originals`` (ingest quarantined it), one without a
    de-identified file as ``unmatched``. A decoder's or parser's own exception counts the file; it
    never ends the report.
    """
    from medops.dicom.io import read_dataset

    folder = Path(deidentified)
    if (folder / "dicom").is_dir():
        folder = folder / "dicom"
    report = DeidReport()
    by_uid: dict[str, Dataset] = {}
    for data in _files(folder):
        try:
            ds = read_dataset(data, require_pixels=False)
            report.add_deidentified(ds)
        except Exception:  # DicomReadError, or a value that does not parse when audited
            report.unreadable_outputs += 1
            continue
        if source is not None:
            by_uid[str(ds.get("SOPInstanceUID", ""))] = ds
    if source is not None:
        if key is None:
            raise ValueError("pairing originals with de-identified files needs the key")
        for data in _files(Path(source)):
            try:
                original = read_dataset(data, require_pixels=False)
                match = by_uid.get(deid.pseudonymize_uid(str(original.get("SOPInstanceUID", "")), key))
                if match is not None:
                    report.add_pair(original, match)
            except Exception:  # DicomReadError, or a value that does not parse
                report.unreadable_originals += 1
                continue
            if match is None:
                report.unmatched += 1
    return report
