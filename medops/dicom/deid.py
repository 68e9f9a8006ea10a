"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

:func:`deidentify` applies the profile's action table (PS3.15 Table E.1-1) to a data set, in place
and recursively through sequences:

- The table is data: :mod:`medops.dicom.table_e1_1` holds every row of Table E.1-1 (2026c), with
  its option columns, and :func:`build_profile` turns it into medops' table: CHOICES says which
  action is taken where the standard offers a choice (X/Z, Z/D, X/Z/D, X/Z/U*), DEVIATIONS lists,
  with reasons, where medops does otherwise, ADDITIONS what it handles that the table does not
  name. Every action is checked when this module is imported (:func:`check_profile`): a code
  that :func:`_apply` does not implement is an error, never a kept element.
- ``X`` remove, ``Z`` empty (zero length), ``K`` keep (a sequence is walked), ``U`` replace a UID
  with a keyed pseudonym, ``D`` the patient's pseudonym (Patient ID and Patient's Name only).
- UIDs become ``2.25.<int>`` from HMAC-SHA256(key, UID): the same original UID gives the same new
  UID in every file (so studies and series stay grouped), and nobody without the key can link it
  back. Well-known UIDs (SOP classes, transfer syntaxes, coding schemes: registered in PS3.6
  Annex A) are kept.
- Patient ID / Patient's Name become ``ANON<16 hex>`` from a keyed hash of the original Patient ID,
  stable across files and runs with the same key.
- All private attributes are removed (E.3.10 is not claimed); so are curves and overlays
  (groups 50xx and 60xx), which can carry burned-in text.
- A safety net (SAFETY_NET) covers attributes the table does not name: any other person name (PN)
  is emptied, any other date or time removed, any other free text (ST, LT, UT) or unknown-VR (UN)
  value removed, any other non-registered UID replaced.
- Options (PS3.15 E.3): Retain Patient Characteristics (E.3.7: sex, size, weight kept, age
  recomputed from the original dates) when ``retain_characteristics`` (the default, because the
  metadata table carries them; its C, clean, actions are not implemented: the basic action
  applies); Retain Longitudinal Temporal Information with Modified Dates (E.3.6) when
  ``retain_longitudinal``: every date (DA, DT) but the birth date is shifted by a per-patient
  keyed offset instead of removed or emptied; times (TM) keep the basic action.
- PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence
  (113100 Basic Application Confidentiality Profile, plus the codes of exactly the options
  applied, DCM) are set.

The key comes from :func:`resolve_deid_key`: the environment variable ``deid.key_env`` or a
per-project key file below ``.medops/secrets`` (never in the repository, never logged).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID_dictionary

from medops import __version__
from medops.config import DeidConfig
from medops.dicom import table_e1_1
from medops.dicom.io import elements, stored_text, text_value

log = logging.getLogger(__name__)

Action = Literal["X", "Z", "K", "U", "D"]
# the action codes _apply implements; any other code in the table is an error at import
ACTIONS: frozenset[str] = frozenset({"X", "Z", "K", "U", "D"})

# medops' choice where PS3.15 Table E.1-1 (medops.dicom.table_e1_1) offers one, by the Basic Profile
# column's code. The least revealing choice is taken; medops keeps images for training and does
# not claim IOD conformance for the Type 1 attributes of non-image IODs (SR, RT, presentation
# states) that D (a dummy value) exists for, so D and X/D remove. X/Z/U* (Referenced / Source
# Image Sequence) keeps the sequence and walks it: its instance UIDs are replaced (U) and its items
# get the same profile, so references between the de-identified images still resolve.
CHOICES: dict[str, Action] = {
    "X": "X", "Z": "Z", "U": "U", "D": "X", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "Z/D": "Z",
    "X/Z/U*": "K",
}
# Where medops' action differs from CHOICES (and from the options it applies), with the reason.
# tests/unit/test_deid_profile.py fails on any other difference from the standard's table.
DEVIATIONS: dict[str, tuple[Action, str]] = {
    "PatientName": ("D", "the patient's pseudonym (Z allows a dummy value): one patient's files "
                         "stay linked, nobody without the key can link them back"),
    "PatientID": ("D", "Z/D resolved to D, the patient's pseudonym (as Patient's Name)"),
    "PersonName": ("Z", "D asks for a dummy name; medops empties it (no name is the safest dummy)"),
    "VerifyingObserverName": ("Z", "D asks for a dummy name; medops empties it, as Person Name"),
    "EthnicGroup": ("X", "Retain Patient Characteristics permits keeping it; medops neither uses "
                         "nor records it, and it is a special category of personal data"),
    "SmokingStatus": ("X", "Retain Patient Characteristics permits keeping it; medops does not "
                           "use it: removed, as the Basic Profile does"),
    "PregnancyStatus": ("X", "Retain Patient Characteristics permits keeping it; medops does not "
                             "use it: removed, as the Basic Profile does"),
}
# Attributes that Table E.1-1 (2026c) does not name and medops removes or handles all the same:
# they name or describe people, places or originals, or they are the de-identification record,
# which deidentify writes afresh (K: left for it to overwrite).
ADDITIONS: dict[str, Action] = {
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
# The safety net, by VR, for attributes the table does not name: any other person name is emptied,
# UID replaced, date or time removed (shifted with retain_longitudinal), free text (ST, LT, UT) or
# value of unknown meaning (UN) removed; other VRs (codes, numbers, pixel data) are kept.
SAFETY_NET: dict[str, Action] = {
    "PN": "Z", "UI": "U", "DA": "X", "DT": "X", "TM": "X", "ST": "X", "LT": "X", "UT": "X",
    "UN": "X",
}
# Repeating groups Table E.1-1 names, removed as whole groups by _apply (curves and overlays can
# carry burned-in text); with odd (private) groups, the rows of the table that have no single tag
_CURVE_GROUPS, _OVERLAY_GROUPS = (0x5000, 0x50FF), (0x6000, 0x60FF)
_GROUP_ROWS = frozenset({"(50XX,XXXX)", "(60XX,3000)", "(60XX,4000)", "(GGGG,EEEE)"})
# File Meta Information (PS3.10 7.1): AE titles and addresses name the sending site
_META_REMOVE = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
                "SendingPresentationAddress", "ReceivingPresentationAddress",
                "PrivateInformationCreatorUID", "PrivateInformation")


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo in the table must fail loudly, not leave an attribute in place
        raise KeyError(f"unknown DICOM keyword in the de-identification table: {keyword}")
    return Tag(tag)


_BIRTH_DATE = _tag("PatientBirthDate")
_PATIENT_ID, _PATIENT_NAME, _PATIENT_AGE = _tag("PatientID"), _tag("PatientName"), _tag("PatientAge")


def build_profile(rows: tuple[table_e1_1.Row, ...], *, characteristics: bool) -> dict[BaseTag, Action]:
    """medops' action for each tag of Table E.1-1 (``rows``), with the Retain Patient
    Characteristics Option (E.3.7) applied when ``characteristics``: CHOICES by the Basic Profile
    code, an option's K where the option applies (its C, clean, is not implemented: the basic
    action stays), then DEVIATIONS and ADDITIONS. Checked before it is returned (check_profile).

    Raises:
        ValueError: a code medops does not know, or a row of the table it cannot apply.
    """
    table: dict[BaseTag, Action] = {}
    for row in rows:
        if row.value is None:
            if row.tag not in _GROUP_ROWS:  # a new repeating-group row must not be skipped unseen
                raise ValueError(f"Table E.1-1 row {row.tag} {row.name} is not applied by medops")
            continue
        if row.basic not in CHOICES:
            raise ValueError(f"Table E.1-1 action {row.basic!r} of {row.tag} has no medops choice")
        action = CHOICES[row.basic]
        if characteristics and row.options.get("characteristics") == "K":
            action = "K"
        table[Tag(row.value)] = action
    for keyword, (action, _) in DEVIATIONS.items():
        table[_tag(keyword)] = action
    for keyword, action in ADDITIONS.items():
        table[_tag(keyword)] = action
    check_profile(table)
    return table


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def check_profile(table: dict[BaseTag, str]) -> None:
    """Raise ValueError unless every action of ``table`` is one :func:`_apply` implements, U is
    given to UIDs only and D (the patient's pseudonym) to Patient's Name and Patient ID only.
    Called once per table at import: an unknown code would otherwise keep its element."""
    for tag, action in table.items():
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r} for {Tag(tag)} in the de-identification table")
        if action == "U" and _dictionary_vr(tag) != "UI":
            raise ValueError(f"action U (replace UID) for {Tag(tag)}, which is not a UID")
        if action == "D" and tag not in (_PATIENT_NAME, _PATIENT_ID):
            raise ValueError(f"action D (the patient's pseudonym) for {Tag(tag)}")


_IDENTITY_REMOVED, _METHOD = _tag("PatientIdentityRemoved"), _tag("DeidentificationMethod")
_METHOD_CODES = _tag("DeidentificationMethodCodeSequence")
_LONGITUDINAL = _tag("LongitudinalTemporalInformationModified")
_DATE_VRS = frozenset({"DA", "DT"})
if set(SAFETY_NET.values()) - ACTIONS:  # a code _apply does not implement
    raise ValueError(f"unknown action in the safety net: {SAFETY_NET}")
# with the Retain Patient Characteristics Option (medops' default), and without it
PROFILE: dict[BaseTag, Action] = build_profile(table_e1_1.ROWS, characteristics=True)
BASIC_PROFILE: dict[BaseTag, Action] = build_profile(table_e1_1.ROWS, characteristics=False)

METHOD = f"PS3.15 E Basic Profile; medops {__version__}"
MEDOPS_IMPLEMENTATION_UID = "2.25.164379224683301542405627311478395741114"
PROFILE_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "longitudinal": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "characteristics": ("113108", "Retain Patient Characteristics Option"),
}


# --- the key ----------------------------------------------------------------------------------

def resolve_deid_key(cfg: DeidConfig, *, state_dir: Path | None = None) -> bytes:
    """The secret for keyed hashes: ``$<cfg.key_env>`` if set, else the project's key file.

    The key file ``<project>/.medops/secrets/deid.key`` (32 random bytes, mode 0600) is created on
    first use with a warning: pseudonyms are only stable while it is kept, and it must be backed up
    like any secret. It lives in the untracked state folder, never in the repository.

    Args:
        cfg: the ``ingest.deid`` section.
        state_dir: the project state folder (default ``ProjectPaths.discover().state``).
    """
    env = os.environ.get(cfg.key_env)
    if env:
        return env.encode()
    if state_dir is None:
        from medops.paths import ProjectPaths

        state_dir = ProjectPaths.discover().state
    path = Path(state_dir) / "secrets" / "deid.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            log.warning("no de-identification key in $%s: created a new one at %s; keep it safe, "
                        "pseudonyms change if it is lost", cfg.key_env, path)
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"the de-identification key file {path} holds {len(key)} bytes; need >= 16")
    return key


# --- pseudonyms -------------------------------------------------------------------------------

def _digest(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def pseudonymize_uid(uid: str, key: bytes) -> str:
    """A keyed UID replacement (PS3.15 E.1 action U): ``2.25.`` + 128 bits of HMAC-SHA256(uid).

    PS3.5 B.2 UUID-derived form; at most 44 characters, within the UI limit of 64.
    """
    return "2.25." + str(int.from_bytes(_digest(key, "uid", str(uid).strip())[:16], "big"))


def pseudonymize_patient(patient_key: str, key: bytes) -> str:
    """A stable pseudonymous Patient ID: ``ANON`` + 16 hex digits of HMAC-SHA256(original id)."""
    return "ANON" + _digest(key, "patient", patient_key).hex()[:16].upper()


def date_shift_days(patient_key: str, key: bytes) -> int:
    """Per-patient date offset for E.3.6 (Modified Dates): 1 to 3,650 days into the past."""
    return -(1 + int.from_bytes(_digest(key, "date", patient_key)[:8], "big") % 3650)


def patient_key_of(ds: Dataset) -> str:
    """What identifies the patient in the original: Patient ID, else name + birth date, else study."""
    pid = text_value(ds, "PatientID").strip()
    if pid:
        return "id:" + pid
    name, birth = text_value(ds, "PatientName").strip(), text_value(ds, "PatientBirthDate")
    if name:
        return f"name:{name}|{birth}"
    return "study:" + text_value(ds, "StudyInstanceUID")


def _parse_da(value: str) -> dt.date | None:
    """The date of a DA value, or the date part of a DT value (YYYYMMDD, PS3.5 6.2); None if it
    is not one."""
    text = str(value).strip()[:8]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> int | None:
    """Whole years at the study, from the ORIGINAL header: Patient's Age (AS, PS3.5 6.2), else the
    birth date and the first of Study / Series / Acquisition / Content Date. None if unknown."""
    age = text_value(ds, "PatientAge").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        n = int(age[:3])
        return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[age[3]]
    birth = _parse_da(text_value(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        on = _parse_da(text_value(ds, keyword))
        if on is not None and on >= birth:
            return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return None


def patient_sex(ds: Dataset) -> str | None:
    """Patient's Sex (0010,0040) as M / F / O, None when absent or not one of those."""
    sex = text_value(ds, "PatientSex").strip().upper()
    return sex if sex in {"M", "F", "O"} else None


def _age_string(years: int) -> str:
    return f"{min(years, 999):03d}Y"


def _shift_date_value(value: object, days: int) -> str | None:
    """Shift a DA or DT value (its first 8 characters) by ``days``; None if it is not one date
    (empty, several values, unparseable) or the shifted date falls before year 1."""
    if not isinstance(value, str) or "\\" in value:  # several values, or nothing
        return None
    text = value.strip()
    day = _parse_da(text)
    if day is None:
        return None
    try:
        shifted = day + dt.timedelta(days=days)
    except OverflowError:
        return None
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}" + text[8:]


# --- the profile ------------------------------------------------------------------------------

def _is_registered_uid(value: str) -> bool:
    return str(value).strip() in UID_dictionary


def _replace_uids(value: object, key: bytes) -> object:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return [v if _is_registered_uid(v) else pseudonymize_uid(str(v), key) for v in value]  # type: ignore[union-attr]
    if not value or _is_registered_uid(str(value)):
        return value
    return pseudonymize_uid(str(value), key)


def _vr_of(tag: BaseTag, elem: DataElement | RawDataElement) -> str:
    """The VR that decides an element's action, without parsing its value.

    An element read from an explicit-VR file carries its VR; one read from an implicit-VR file, or
    stored as UN, takes the data dictionary's (as pydicom does when it parses the value); a tag the
    dictionary does not know is UN, which the safety net removes.
    """
    vr = elem.VR
    if vr is None or vr == "UN":
        try:
            return dictionary_VR(tag)
        except KeyError:
            return "UN"
    return vr


def _encoding(ds: Dataset) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a data set read from a file in a little-endian transfer
    syntax; None for one built in memory (or big endian)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    return (implicit, little) if implicit is not None and little is True else None


def _put(ds: Dataset, tag: BaseTag, vr: str, text: str | None) -> None:
    """Set an element to a text value (None: empty). In a data set read from a file it is stored
    already encoded, as pydicom encodes it (ASCII, padded to an even length with NUL for UI and a
    space otherwise), so that it is written back without being parsed (medops.dicom.io); the
    values set here (pseudonyms, UIDs, dates, codes) are ASCII, which every DICOM character set
    encodes alike."""
    encoding = _encoding(ds)
    if encoding is None or (text is not None and not text.isascii()):
        ds[tag] = DataElement(tag, vr, text)  # None: empty (an empty Sequence for SQ)
        return
    data = (text or "").encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    implicit = encoding[0]
    ds[tag] = RawDataElement(tag, None if implicit else vr, len(data), data, 0, implicit, True)


def _apply(ds: Dataset, table: dict[BaseTag, Action], key: bytes, pseudonym: str,
           shift: int | None) -> None:
    """Apply ``table`` (else the safety net) to one data set level, recursing into kept sequences.

    An element is parsed only when its action needs its value (a UID to replace, a date to shift,
    a sequence to walk): a kept element stays as read and is written back byte for byte, and a
    removed one is never parsed.
    """
    for tag, stored in list(elements(ds).items()):
        group = tag >> 16
        if group & 1 or _CURVE_GROUPS[0] <= group <= _CURVE_GROUPS[1] \
                or _OVERLAY_GROUPS[0] <= group <= _OVERLAY_GROUPS[1]:  # odd: private
            del ds[tag]
            continue
        vr = _vr_of(tag, stored)
        action = table.get(tag) or SAFETY_NET.get(vr, "K")
        if shift is not None and vr in _DATE_VRS and action in ("X", "Z") and tag != _BIRTH_DATE:
            # E.3.6: keep the intervals between a patient's events, move the dates; a value that
            # is not one date (empty, several, unparseable) gets the action instead
            text = stored_text(stored)
            shifted = _shift_date_value(ds[tag].value if text is None else text, shift)
            if shifted is not None:
                _put(ds, tag, vr, shifted)
                continue
        if action == "K":
            if vr == "SQ":
                for item in ds[tag].value:
                    _apply(item, table, key, pseudonym, shift)
        elif action == "X":
            del ds[tag]
        elif action == "Z":
            _put(ds, tag, vr, None)
        elif action == "D":  # Patient's Name and Patient ID: both become the patient's pseudonym
            _put(ds, tag, vr, pseudonym)
        elif action == "U":  # read from the stored bytes where possible: no need to parse it
            text = stored_text(stored)
            value = ds[tag].value if text is None else text.split("\\") if "\\" in text else text
            uids = _replace_uids(value, key)
            text = "\\".join(str(u) for u in uids) if isinstance(uids, list) else uids
            _put(ds, tag, vr, str(text) if text else None)
        else:  # check_profile makes this unreachable; never keep an element by falling through
            raise ValueError(f"unknown de-identification action {action!r} for {Tag(tag)}")


def _method_code_sequence(options: list[str]) -> Sequence:
    items = []
    for name in ["basic", *options]:
        code, meaning = PROFILE_CODES[name]
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    return Sequence(items)


@functools.lru_cache(maxsize=8)
def _method_code_sequence_value(options: tuple[str, ...], implicit_vr: bool) -> bytes:
    """The encoded value (items) of DeidentificationMethodCodeSequence, little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit_vr
    write_data_element(fp, DataElement(_METHOD_CODES, "SQ", _method_code_sequence(list(options))))
    return fp.getvalue()[8 if implicit_vr else 12:]  # after the tag, (VR, reserved,) and length


_UNSET: object = object()


def applied_options(*, retain_longitudinal: bool, retain_characteristics: bool) -> tuple[str, ...]:
    """The PROFILE_CODES names of the options :func:`deidentify` applies, in the order their codes
    are listed in DeidentificationMethodCodeSequence (after 113100, the Basic Profile)."""
    return (("characteristics",) if retain_characteristics else ()) + \
        (("longitudinal",) if retain_longitudinal else ())


def deidentify(ds: Dataset, key: bytes, *, retain_longitudinal: bool = False,
               retain_characteristics: bool = True, age: "int | None | object" = _UNSET) -> Dataset:
    """De-identify ``ds`` in place by the PS3.15 Annex E Basic Profile and return it.

    Args:
        ds: a data set from :func:`medops.dicom.io.read_dataset`, parsed or not: only what the
            profile changes is parsed, kept elements stay as read.
        key: the secret for keyed hashes (:func:`resolve_deid_key`).
        retain_longitudinal: E.3.6 Modified Dates option: shift dates per patient instead of
            removing them.
        retain_characteristics: E.3.7 Retain Patient Characteristics option (on by default:
            ingest's metadata carries sex and age): sex, size, weight and sex neutered are kept
            and the age is recomputed from the original header; off, they are removed (sex
            emptied) as the Basic Profile says.
        age: :func:`patient_age_years` of ``ds`` when the caller has it already.

    Returns:
        ``ds``, with its file meta updated (new Media Storage SOP Instance UID, no AE titles).
    """
    patient_key = patient_key_of(ds)
    pseudonym = pseudonymize_patient(patient_key, key)
    if age is _UNSET and retain_characteristics:
        age = patient_age_years(ds)
    shift = date_shift_days(patient_key, key) if retain_longitudinal else None

    _apply(ds, PROFILE if retain_characteristics else BASIC_PROFILE, key, pseudonym, shift)

    _put(ds, _PATIENT_ID, "LO", pseudonym)
    _put(ds, _PATIENT_NAME, "PN", pseudonym)
    if retain_characteristics:
        if age is not None:
            _put(ds, _PATIENT_AGE, "AS", _age_string(age))  # type: ignore[arg-type]
        elif _PATIENT_AGE in ds:
            del ds[_PATIENT_AGE]  # an unparseable age string is free text
    _put(ds, _IDENTITY_REMOVED, "CS", "YES")
    _put(ds, _METHOD, "LO", METHOD)
    options = applied_options(retain_longitudinal=retain_longitudinal,
                              retain_characteristics=retain_characteristics)
    encoding = _encoding(ds)
    if encoding is None:
        ds[_METHOD_CODES] = DataElement(_METHOD_CODES, "SQ", _method_code_sequence(list(options)))
    else:  # the same few bytes for every file: encoded once per process
        value = _method_code_sequence_value(options, encoding[0])
        ds[_METHOD_CODES] = RawDataElement(_METHOD_CODES, None if encoding[0] else "SQ", len(value),
                                           value, 0, encoding[0], True)
    _put(ds, _LONGITUDINAL, "CS", "MODIFIED" if retain_longitudinal else "REMOVED")

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for keyword in _META_REMOVE:
            if keyword in meta:
                delattr(meta, keyword)
        # read as stored: parsing them would have them re-encoded when the file is written
        for meta_keyword, keyword in (("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
                                      ("MediaStorageSOPClassUID", "SOPClassUID")):
            if keyword in ds:
                setattr(meta, meta_keyword, text_value(ds, keyword) or None)
        meta.ImplementationClassUID = MEDOPS_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"MEDOPS_{__version__}"[:16]
    return ds
