"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

:func:`deidentify` applies the profile's action table (PS3.15 Table E.1-1) to a data set, in place
and recursively through sequences:

- ``X`` remove, ``Z`` empty (zero length), ``K`` keep, ``U`` replace a UID with a keyed pseudonym;
  ``D`` (a dummy value) is used for Patient ID and Patient's Name, which get a stable pseudonym.
- UIDs become ``2.25.<int>`` from HMAC-SHA256(key, UID): the same original UID gives the same new
  UID in every file (so studies and series stay grouped), and nobody without the key can link it
  back. Well-known UIDs (SOP classes, transfer syntaxes, coding schemes: registered in PS3.6
  Annex A) are kept.
- Patient ID / Patient's Name become ``ANON<16 hex>`` from a keyed hash of the original Patient ID,
  stable across files and runs with the same key.
- All private attributes are removed (E.3.10 is not claimed); so are curves and overlays
  (groups 50xx and 60xx), which can carry burned-in text.
- The table holds about 300 of Table E.1-1's attributes (every patient, visit, order, person,
  institution, device, date, free-text and UID row that an imaging export carries). A safety net
  covers the rest: any other person name (PN) is emptied, any other date or time removed, any
  other free text (ST, LT, UT) or unknown-VR (UN) value removed, any other non-registered UID
  replaced.
- Options (PS3.15 E.3): Retain Patient Characteristics (E.3.7: sex and age kept, age recomputed
  from the original dates) is always on, because the metadata table carries them;
  Retain Longitudinal Temporal Information with Modified Dates (E.3.6) when
  ``retain_longitudinal``: dates are shifted by a per-patient keyed offset instead of removed.
- PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence
  (113100 Basic Application Confidentiality Profile, plus the option codes, DCM) are set.

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
from medops.dicom.io import elements, stored_text, text_value

log = logging.getLogger(__name__)

Action = Literal["X", "Z", "K", "U", "D"]

# PS3.15 Table E.1-1, Basic Profile column. Where the profile allows a choice (X/Z, Z/D, X/Z/D,
# X/Z/U*) the least revealing choice that keeps the file valid is taken: Z for Type 2 attributes
# of the IODs medops reads, X otherwise, U for UIDs. Patient characteristics (E.3.7) are K.
_PROFILE: dict[str, Action] = {
    # --- patient identification and demographics ---
    "PatientName": "D", "PatientID": "D", "PatientBirthDate": "Z", "PatientSex": "K",
    "PatientAge": "K", "PatientSize": "K", "PatientWeight": "K", "PatientSexNeutered": "K",
    "PatientBirthTime": "X", "PatientBirthName": "X", "PatientAddress": "X",
    "PatientTelephoneNumbers": "X", "PatientTelecomInformation": "X",
    "PatientMotherBirthName": "X", "OtherPatientIDs": "X", "OtherPatientNames": "X",
    "OtherPatientIDsSequence": "X", "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X", "ReferencedPatientAliasSequence": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientPrimaryLanguageCodeSequence": "X",
    "InsurancePlanIdentification": "X", "MilitaryRank": "X", "BranchOfService": "X",
    "MedicalRecordLocator": "X", "EthnicGroup": "X", "Occupation": "X",
    "AdditionalPatientHistory": "X", "PatientComments": "X", "PatientReligiousPreference": "X",
    "CountryOfResidence": "X", "RegionOfResidence": "X", "MedicalAlerts": "X", "Allergies": "X",
    "SmokingStatus": "X", "PregnancyStatus": "X", "LastMenstrualDate": "X", "PatientState": "X",
    "SpecialNeeds": "X", "ResponsiblePerson": "X", "ResponsiblePersonRole": "X",
    "ResponsibleOrganization": "X", "ReferencedPatientSequence": "X",
    "ReferencedPatientPhotoSequence": "X", "PatientTransportArrangements": "X",
    "PatientInstitutionResidence": "X", "PatientAlternativeCalendar": "X",
    "PatientBirthDateInAlternativeCalendar": "X", "PatientDeathDateInAlternativeCalendar": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    # --- study, visit, request and procedure step ---
    "StudyDate": "Z", "StudyTime": "Z", "ContentDate": "Z", "ContentTime": "Z",
    "SeriesDate": "X", "SeriesTime": "X", "AcquisitionDate": "X", "AcquisitionTime": "X",
    "AcquisitionDateTime": "X", "InstanceCreationDate": "X", "InstanceCreationTime": "X",
    "OverlayDate": "X", "OverlayTime": "X", "CurveDate": "X", "CurveTime": "X",
    "TimezoneOffsetFromUTC": "X",
    "AccessionNumber": "Z", "StudyID": "Z", "StudyDescription": "X", "SeriesDescription": "X",
    "StudyComments": "X", "ReasonForStudy": "X", "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X", "AdmissionID": "X", "IssuerOfAdmissionIDSequence": "X",
    "DischargeDiagnosisDescription": "X", "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X", "VisitComments": "X", "CurrentPatientLocation": "X",
    "RequestAttributesSequence": "X", "RequestedProcedureDescription": "X",
    "RequestedProcedureID": "X", "RequestedProcedureComments": "X",
    "ReasonForTheRequestedProcedure": "X", "RequestedContrastAgent": "X",
    "ImagingServiceRequestComments": "X", "PlacerOrderNumberImagingServiceRequest": "X",
    "FillerOrderNumberImagingServiceRequest": "X", "OrderEnteredBy": "X",
    "OrderEntererLocation": "X", "OrderCallbackPhoneNumber": "X",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepLocation": "X", "ScheduledStationName": "X",
    "ScheduledStationAETitle": "X", "ScheduledPerformingPhysicianName": "X",
    "PerformedProcedureStepDescription": "X", "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "PerformedLocation": "X", "PerformedStationName": "X", "PerformedStationAETitle": "X",
    "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X",
    # --- people ---
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X", "ReferringPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X", "PhysiciansOfRecordIdentificationSequence": "X",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X", "PhysiciansReadingStudyIdentificationSequence": "X",
    "ConsultingPhysicianName": "X", "ConsultingPhysicianIdentificationSequence": "X",
    "RequestingPhysician": "X", "RequestingService": "X", "OperatorsName": "X",
    "OperatorIdentificationSequence": "X", "ContentCreatorName": "Z",
    "ContentCreatorIdentificationCodeSequence": "X", "VerifyingObserverName": "Z",
    "VerifyingOrganization": "X", "PersonName": "Z", "PersonAddress": "X",
    "PersonTelephoneNumbers": "X", "PersonIdentificationCodeSequence": "X",
    "HumanPerformerName": "X", "HumanPerformerOrganization": "X",
    "ScheduledHumanPerformersSequence": "X", "ActualHumanPerformersSequence": "X",
    "EvaluatorName": "X", "ReviewerName": "X", "DistributionName": "X",
    "DistributionAddress": "X", "PhysicianApprovingInterpretation": "X",
    "InterpretationRecorder": "X", "InterpretationTranscriber": "X", "InterpretationAuthor": "X",
    "InterpretationApproverSequence": "X", "InterpretationText": "X", "ResultsComments": "X",
    "AuthorObserverSequence": "X", "ParticipantSequence": "X",
    "CustodialOrganizationSequence": "X",
    # --- institution and equipment ---
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X", "InstitutionCodeSequence": "X",
    "StationName": "X", "StationAETitle": "X", "DeviceSerialNumber": "X", "DeviceUID": "U",
    "DetectorID": "X", "GantryID": "X", "GeneratorID": "X", "SourceSerialNumber": "X",
    # --- free text and descriptions ---
    "ImageComments": "X", "FrameComments": "X", "TextComments": "X", "IdentifyingComments": "X",
    "DerivationDescription": "X", "ProtocolName": "X", "AcquisitionComments": "X",
    "AcquisitionDeviceProcessingDescription": "X", "AnnotationContentSequence": "X",
    "ContrastBolusAgent": "Z",
    # --- clinical trial (E.1-1 lists them; medops is not a trial tool) ---
    "ClinicalTrialSubjectID": "X", "ClinicalTrialSponsorName": "X",
    # --- security and provenance sequences that may hold originals ---
    "DigitalSignaturesSequence": "X", "EncryptedAttributesSequence": "X",
    "OriginalAttributesSequence": "X", "ModifiedAttributesSequence": "X",
    "MACParametersSequence": "X", "DataSetTrailingPadding": "X",
    # --- UIDs ---
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U", "SynchronizationFrameOfReferenceUID": "U",
    "InstanceCreatorUID": "U", "StorageMediaFileSetUID": "U", "TransactionUID": "U",
    "IrradiationEventUID": "U", "ConcatenationUID": "U", "DimensionOrganizationUID": "U",
    "ReferencedSOPInstanceUID": "U",
    # --- admissions, orders, results, reports, annotations, devices, specimens ---
    "AcquisitionContextSequence": "X", "AcquisitionProtocolDescription": "X", "AdmittingDate": "X",
    "AdmittingTime": "X", "CassetteID": "X", "ContentSequence": "X", "ContributionDateTime": "X",
    "ContributionDescription": "X", "CurrentObserverTrial": "X", "DateTime": "X", "Date": "X",
    "Time": "X", "DeviceDescription": "X", "DigitalSignatureUID": "X", "DischargeDate": "X",
    "DischargeTime": "X", "EndAcquisitionDateTime": "X", "ExpectedCompletionDateTime": "X",
    "GraphicAnnotationSequence": "X", "IconImageSequence": "X", "ImagePresentationComments": "X",
    "Impressions": "X", "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "IssueDateOfImagingServiceRequest": "X", "IssueTimeOfImagingServiceRequest": "X",
    "IssuerOfAdmissionID": "X", "IssuerOfServiceEpisodeID": "X", "MAC": "X",
    "ModifyingDeviceID": "X", "ModifyingDeviceManufacturer": "X",
    "NamesOfIntendedRecipientsOfResults": "X", "PreMedication": "X",
    "ReferencedDigitalSignatureSequence": "X", "ReferencedSOPInstanceMACSequence": "X",
    "ResultsIDIssuer": "X", "ResultsID": "X", "ReviewDate": "X", "ReviewTime": "X",
    "ScheduledPatientInstitutionResidence": "X", "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X", "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X", "StudyIDIssuer": "X", "StudyVerifiedDate": "X",
    "StudyVerifiedTime": "X", "StudyReadDate": "X", "StudyReadTime": "X", "TextString": "X",
    "TopicAuthor": "X", "TopicKeywords": "X", "TopicSubject": "X", "TopicTitle": "X",
    "AcquisitionDeviceProcessingCode": "X", "ScheduledProcedureStepSequence": "X",
    "SecondaryCaptureDeviceID": "X", "DateOfSecondaryCapture": "X", "TimeOfSecondaryCapture": "X",
    "DateOfLastCalibration": "X", "TimeOfLastCalibration": "X",
    "DateOfLastDetectorCalibration": "X", "PlateID": "X", "RequestedProcedureLocation": "X",
    "ReasonForRequestedProcedureCodeSequence": "X", "ConfidentialityCode": "X",
    "ReferencedRequestSequence": "X", "ScheduledStationGeographicLocationCodeSequence": "X",
    "PerformedStationGeographicLocationCodeSequence": "X", "ScheduledStationNameCodeSequence": "X",
    "PerformedStationNameCodeSequence": "X", "InterpretationDiagnosisDescription": "X",
    "InterpretationIDIssuer": "X", "InterpretationID": "X", "AnnotationGroupDescription": "X",
    "LabelText": "X", "SlideIdentifier": "X", "SpecimenAccessionNumber": "X",
    "SpecimenDetailedDescription": "X", "ContainerIdentifier": "X", "ContainerDescription": "X",
    "AlternateContainerIdentifierSequence": "X", "VerifyingObserverIdentificationCodeSequence": "Z",
    # --- more UIDs ---
    "DoseReferenceUID": "U", "FailedSOPInstanceUIDList": "U", "FiducialUID": "U",
    "LargePaletteColorLookupTableUID": "U", "ObservationUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",
    "RelatedFrameOfReferenceUID": "U", "TemplateExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U", "UID": "U", "MediaStorageSOPInstanceUID": "U",
    "SpecimenUID": "U", "PaletteColorLookupTableUID": "U", "CreatorVersionUID": "U",
    "TargetUID": "U", "ReferencedObservationUIDTrial": "U", "PatientSetupUID": "U",
    # --- the de-identification record itself (written afresh) ---
    "PatientIdentityRemoved": "K", "DeidentificationMethod": "K",
    "DeidentificationMethodCodeSequence": "K", "LongitudinalTemporalInformationModified": "K",
}
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


PROFILE: dict[BaseTag, Action] = {_tag(k): a for k, a in _PROFILE.items()}
_BIRTH_DATE = _tag("PatientBirthDate")
_PATIENT_ID, _PATIENT_NAME, _PATIENT_AGE = _tag("PatientID"), _tag("PatientName"), _tag("PatientAge")
_IDENTITY_REMOVED, _METHOD = _tag("PatientIdentityRemoved"), _tag("DeidentificationMethod")
_METHOD_CODES = _tag("DeidentificationMethodCodeSequence")
_LONGITUDINAL = _tag("LongitudinalTemporalInformationModified")
_DATE_VRS, _TEXT_VRS = {"DA", "DT"}, {"ST", "LT", "UT"}

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


def _shift_date_value(value: str, days: int) -> str | None:
    """Shift a DA or DT value (its first 8 characters) by ``days``; None if it cannot be parsed."""
    text = str(value).strip()
    day = _parse_da(text)
    if day is None:
        return None
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


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
        ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" and text is None else text)
        return
    data = (text or "").encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    implicit = encoding[0]
    ds[tag] = RawDataElement(tag, None if implicit else vr, len(data), data, 0, implicit, True)


def _apply(ds: Dataset, key: bytes, pseudonym: str, shift: int | None) -> None:
    """Apply the profile to one data set level, then recurse into kept sequences.

    An element is parsed only when its action needs its value (a UID to replace, a date to shift,
    a sequence to walk): a kept element stays as read and is written back byte for byte, and a
    removed one is never parsed.
    """
    for tag, stored in list(elements(ds).items()):
        group = tag >> 16
        if group & 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:  # odd: private
            del ds[tag]
            continue
        action = PROFILE.get(tag)
        vr = _vr_of(tag, stored)
        if action is None:
            # safety net for attributes the table does not name
            if vr == "PN":
                action = "Z"
            elif vr == "UI":
                action = "U"
            elif vr in _DATE_VRS or vr == "TM":
                action = "X"
            elif vr in _TEXT_VRS or vr == "UN":
                action = "X"  # free text, or a value whose meaning this pydicom does not know
            else:
                action = "K"
        shift_date = shift is not None and vr in _DATE_VRS and action in ("X", "Z") and tag != _BIRTH_DATE
        if action == "K" and vr != "SQ":
            continue
        if action == "X" and not shift_date:
            del ds[tag]
            continue
        if action == "D":  # PatientName and PatientID: both become the patient's pseudonym
            _put(ds, tag, vr, pseudonym)
            continue
        if action == "Z" and not shift_date:
            _put(ds, tag, vr, None)
            continue
        if action == "U":  # read from the stored bytes where possible: no need to parse it
            text = stored_text(stored)
            value = ds[tag].value if text is None else text.split("\\") if "\\" in text else text
            uids = _replace_uids(value, key)
            text = "\\".join(str(u) for u in uids) if isinstance(uids, list) else uids
            _put(ds, tag, vr, str(text) if text else None)
            continue
        elem = ds[tag]  # parsed from here on
        if shift_date and elem.value:
            # E.3.6: keep the intervals between a patient's events, move the dates
            shifted = _shift_date_value(str(elem.value), shift) if elem.VM == 1 else None  # type: ignore[arg-type]
            if shifted is not None:
                _put(ds, tag, vr, shifted)
                continue
        if action == "X":
            del ds[tag]
        elif action == "Z":
            _put(ds, tag, vr, None)
        elif vr == "SQ":
            for item in elem.value:
                _apply(item, key, pseudonym, shift)


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


def deidentify(ds: Dataset, key: bytes, *, retain_longitudinal: bool = False,
               age: "int | None | object" = _UNSET) -> Dataset:
    """De-identify ``ds`` in place by the PS3.15 Annex E Basic Profile and return it.

    Args:
        ds: a data set from :func:`medops.dicom.io.read_dataset`, parsed or not: only what the
            profile changes is parsed, kept elements stay as read.
        key: the secret for keyed hashes (:func:`resolve_deid_key`).
        retain_longitudinal: E.3.6 Modified Dates option: shift dates per patient instead of
            removing them.
        age: :func:`patient_age_years` of ``ds`` when the caller has it already.

    Returns:
        ``ds``, with its file meta updated (new Media Storage SOP Instance UID, no AE titles).
    """
    patient_key = patient_key_of(ds)
    pseudonym = pseudonymize_patient(patient_key, key)
    if age is _UNSET:
        age = patient_age_years(ds)
    shift = date_shift_days(patient_key, key) if retain_longitudinal else None

    _apply(ds, key, pseudonym, shift)

    _put(ds, _PATIENT_ID, "LO", pseudonym)
    _put(ds, _PATIENT_NAME, "PN", pseudonym)
    if _BIRTH_DATE in ds:
        _put(ds, _BIRTH_DATE, "DA", None)
    if age is not None:
        _put(ds, _PATIENT_AGE, "AS", _age_string(age))  # type: ignore[arg-type]
    elif _PATIENT_AGE in ds:
        del ds[_PATIENT_AGE]  # an unparseable age string is free text
    _put(ds, _IDENTITY_REMOVED, "CS", "YES")
    _put(ds, _METHOD, "LO", METHOD)
    options = ("characteristics",) + (("longitudinal",) if retain_longitudinal else ())
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
