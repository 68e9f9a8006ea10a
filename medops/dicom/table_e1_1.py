"""PS3.15 Table E.1-1, Application Level Confidentiality Profile Attributes, as data.

One row per attribute of the table: its tag, its action in the Basic Profile column, its actions in
the option columns (where the source gives them) and its name. :mod:`medops.dicom.deid` builds its
action table from these rows and checks them when it is imported; a test compares the two.

Where the rows come from (no row was typed by hand):

- tag, name and Basic Profile action: ``dicomanonymizer/dicom_anonymization_databases/
  dicomfields_2026c.py`` of the PyPI package ``dicom-anonymizer`` 2.1.0 (Kitware Europe,
  BSD-3-Clause, notice below), which lists the tags of each action of the DICOM 2026c edition;
  its masked tags (curves 50xx, overlays 60xx) are written here as the standard writes them.
- option columns: ``standard/confidentiality_profile_attributes.json`` of the PyPI package
  ``dicom-standard`` 0.1.0 (Innolitics, MIT, notice below), parsed from the 2020 edition of the
  standard, which also gives the "Private attributes" row (gggg odd). Its Basic Profile column
  agrees with dicom-anonymizer's for all but 4 of its 428 attributes, which the standard changed
  since: Patient ID Z -> Z/D, Source Serial Number and Treatment Machine Name X -> X/Z, Treatment
  Site D -> X/D. Attributes added to the table after 2020 have no option actions here ("-").

Regenerate (both packages downloaded with ``pip download --no-deps``, wheels unzipped)::

    python -m medops.dicom.table_e1_1 .../dicomfields_2026c.py \
        .../standard/confidentiality_profile_attributes.json > rows.txt

and paste rows.txt into :data:`_ROWS`; the deid tests then show every change of the standard.

Columns of :data:`_ROWS`: ``tag|basic|options|name``. ``tag`` is ``(gggg,eeee)`` in hex, with
``X`` for any hex digit of a repeating group and ``(GGGG,EEEE)`` for every odd (private) group.
``options`` is ``-`` or space-separated ``option=code`` pairs; the option ids are the keys of
:data:`OPTIONS`. Action codes are PS3.15 E.1.1's: X remove, Z empty (or dummy), D dummy,
K keep, C clean, U replace UID, and the choices X/Z, X/D, X/Z/D, Z/D, X/Z/U*.
"""

from __future__ import annotations

import re
from typing import NamedTuple

EDITION = "2026c"
SOURCES = (
    "dicom-anonymizer 2.1.0 (BSD-3-Clause): dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py",
    "dicom-standard 0.1.0 (MIT): standard/confidentiality_profile_attributes.json (2020 edition; options)",
)
BASIC_CODES = frozenset({"X", "Z", "D", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"})
OPTION_CODES = frozenset({"K", "C"})
# option id -> the option's name in PS3.15 E.3 (Table E.1-1's column headings)
OPTIONS = {
    "safe_private": "Retain Safe Private Option",
    "uids": "Retain UIDs Option",
    "device": "Retain Device Identity Option",
    "institution": "Retain Institution Identity Option",
    "characteristics": "Retain Patient Characteristics Option",
    "long_full": "Retain Longitudinal Temporal Information with Full Dates Option",
    "long_modified": "Retain Longitudinal Temporal Information with Modified Dates Option",
    "clean_desc": "Clean Descriptors Option",
    "clean_struct": "Clean Structured Content Option",
    "clean_graph": "Clean Graphics Option",
}


class Row(NamedTuple):
    tag: str                    # "(0010,0010)", "(60XX,3000)", "(GGGG,EEEE)"
    basic: str                  # the Basic Profile column's action code
    options: dict[str, str]     # option id -> action code, for the options that name this row
    name: str

    @property
    def value(self) -> int | None:
        """The tag as an int, None for a repeating group or the private row."""
        digits = self.tag[1:5] + self.tag[6:10]
        return int(digits, 16) if re.fullmatch(r"[0-9A-F]{8}", digits) else None


def _parse(text: str) -> tuple[Row, ...]:
    rows = []
    for line in text.strip().splitlines():
        tag, basic, options, name = line.split("|")
        if not re.fullmatch(r"\([0-9A-FX]{4},[0-9A-FX]{4}\)|\(GGGG,EEEE\)", tag):
            raise ValueError(f"Table E.1-1 row with a malformed tag: {line!r}")
        if basic not in BASIC_CODES:
            raise ValueError(f"Table E.1-1 row with an unknown Basic Profile action: {line!r}")
        opts = dict(pair.split("=") for pair in options.split()) if options != "-" else {}
        if not set(opts) <= set(OPTIONS) or not set(opts.values()) <= OPTION_CODES | BASIC_CODES:
            raise ValueError(f"Table E.1-1 row with an unknown option or option action: {line!r}")
        rows.append(Row(tag, basic, opts, name))
    if len({r.tag for r in rows}) != len(rows):
        raise ValueError("Table E.1-1 lists a tag twice")
    return tuple(rows)


# tag|basic|options|name  (generated; see the module docstring)
_ROWS = """\
(0000,1000)|X|uids=K|Affected SOP Instance UID
(0000,1001)|U|uids=K|Requested SOP Instance UID
(0002,0003)|U|uids=K|Media Storage SOP Instance UID
(0004,1511)|U|uids=K|Referenced SOP Instance UID in File
(0008,0012)|X/D|-|Instance Creation Date
(0008,0013)|X/Z/D|-|Instance Creation Time
(0008,0014)|U|uids=K|Instance Creator UID
(0008,0015)|X|long_full=K long_modified=C|Instance Coercion DateTime
(0008,0017)|U|-|Acquisition UID
(0008,0018)|U|uids=K|SOP Instance UID
(0008,0019)|U|-|Pyramid UID
(0008,0020)|Z|long_full=K long_modified=C|Study Date
(0008,0021)|X/D|long_full=K long_modified=C|Series Date
(0008,0022)|X/Z|long_full=K long_modified=C|Acquisition Date
(0008,0023)|Z/D|long_full=K long_modified=C|Content Date
(0008,0024)|X|long_full=K long_modified=C|Overlay Date
(0008,0025)|X|long_full=K long_modified=C|Curve Date
(0008,002A)|X/Z/D|long_full=K long_modified=C|Acquisition DateTime
(0008,0030)|Z|long_full=K long_modified=C|Study Time
(0008,0031)|X/D|long_full=K long_modified=C|Series Time
(0008,0032)|X/Z|long_full=K long_modified=C|Acquisition Time
(0008,0033)|Z/D|long_full=K long_modified=C|Content Time
(0008,0034)|X|long_full=K long_modified=C|Overlay Time
(0008,0035)|X|long_full=K long_modified=C|Curve Time
(0008,0050)|Z|-|Accession Number
(0008,0054)|X|-|Retrieve AE Title
(0008,0055)|X|-|Station AE Title
(0008,0058)|U|uids=K|Failed SOP Instance UID List
(0008,0080)|X/Z/D|institution=K|Institution Name
(0008,0081)|X|institution=K|Institution Address
(0008,0082)|X/Z/D|institution=K|Institution Code Sequence
(0008,0090)|Z|-|Referring Physician's Name
(0008,0092)|X|-|Referring Physician's Address
(0008,0094)|X|-|Referring Physician's Telephone Numbers
(0008,0096)|X|-|Referring Physician Identification Sequence
(0008,009C)|Z|-|Consulting Physician's Name
(0008,009D)|X|-|Consulting Physician Identification Sequence
(0008,0106)|D|-|Context Group Version
(0008,0107)|D|-|Context Group Local Version
(0008,0201)|X|long_full=K long_modified=C|Timezone Offset From UTC
(0008,1000)|X|-|Network ID
(0008,1010)|X/Z/D|device=K|Station Name
(0008,1030)|X|clean_desc=C|Study Description
(0008,103E)|X|clean_desc=C|Series Description
(0008,1040)|X|institution=K|Institutional Department Name
(0008,1041)|X|institution=K|Institutional Department Type Code Sequence
(0008,1048)|X|-|Physician(s) of Record
(0008,1049)|X|-|Physician(s) of Record Identification Sequence
(0008,1050)|X|-|Performing Physician's Name
(0008,1052)|X|-|Performing Physician Identification Sequence
(0008,1060)|X|-|Name of Physician(s) Reading Study
(0008,1062)|X|-|Physician(s) Reading Study Identification Sequence
(0008,1070)|X/Z/D|-|Operators' Name
(0008,1072)|X/D|-|Operator Identification Sequence
(0008,1080)|X|clean_desc=C|Admitting Diagnoses Description
(0008,1084)|X|clean_desc=C|Admitting Diagnoses Code Sequence
(0008,1088)|X|-|Pyramid Description
(0008,1110)|X/Z|uids=K|Referenced Study Sequence
(0008,1111)|X/Z/D|uids=K|Referenced Performed Procedure Step Sequence
(0008,1120)|X|uids=X|Referenced Patient Sequence
(0008,1140)|X/Z/U*|uids=K|Referenced Image Sequence
(0008,1155)|U|uids=K|Referenced SOP Instance UID
(0008,1195)|U|uids=K|Transaction UID
(0008,1301)|X|-|Principal Diagnosis Code Sequence
(0008,1302)|X|-|Primary Diagnosis Code Sequence
(0008,1303)|X|-|Secondary Diagnoses Code Sequence
(0008,1304)|X|-|Histological Diagnoses Code Sequence
(0008,2111)|X|clean_desc=C|Derivation Description
(0008,2112)|X/Z/U*|uids=K|Source Image Sequence
(0008,3010)|U|uids=K|Irradiation Event UID
(0008,4000)|X|clean_desc=C|Identifying Comments
(0010,0010)|Z|-|Patient's Name
(0010,0011)|X|-|Person Names to Use Sequence
(0010,0012)|X|-|Name to Use
(0010,0013)|X|-|Name to Use Comment
(0010,0014)|X|-|Third Person Pronouns Sequence
(0010,0015)|X|-|Pronoun Code Sequence
(0010,0016)|X|-|Pronoun Comment
(0010,0020)|Z/D|-|Patient ID
(0010,0021)|X|-|Issuer of Patient ID
(0010,0030)|Z|-|Patient's Birth Date
(0010,0032)|X|-|Patient's Birth Time
(0010,0040)|Z|characteristics=K|Patient's Sex
(0010,0041)|X|-|Gender Identity Sequence
(0010,0042)|X|-|Sex Parameters for Clinical Use Category Comment
(0010,0043)|X|-|Sex Parameters for Clinical Use Category Sequence
(0010,0044)|X|-|Gender Identity Code Sequence
(0010,0045)|X|-|Gender Identity Comment
(0010,0046)|X|-|Sex Parameters for Clinical Use Category Code Sequence
(0010,0047)|X|-|Sex Parameters for Clinical Use Category Reference
(0010,0050)|X|-|Patient's Insurance Plan Code Sequence
(0010,0101)|X|-|Patient's Primary Language Code Sequence
(0010,0102)|X|-|Patient's Primary Language Modifier Code Sequence
(0010,1000)|X|-|Other Patient IDs
(0010,1001)|X|-|Other Patient Names
(0010,1002)|X|-|Other Patient IDs Sequence
(0010,1005)|X|-|Patient's Birth Name
(0010,1010)|X|characteristics=K|Patient's Age
(0010,1020)|X|characteristics=K|Patient's Size
(0010,1030)|X|characteristics=K|Patient's Weight
(0010,1040)|X|-|Patient's Address
(0010,1050)|X|-|Insurance Plan Identification
(0010,1060)|X|-|Patient's Mother's Birth Name
(0010,1080)|X|-|Military Rank
(0010,1081)|X|-|Branch of Service
(0010,1090)|X|-|Medical Record Locator
(0010,1100)|X|-|Referenced Patient Photo Sequence
(0010,2000)|X|clean_desc=C|Medical Alerts
(0010,2110)|X|characteristics=C clean_desc=C|Allergies
(0010,2150)|X|-|Country of Residence
(0010,2152)|X|-|Region of Residence
(0010,2154)|X|-|Patient's Telephone Numbers
(0010,2155)|X|-|Patient's Telecom Information
(0010,2160)|X|characteristics=K|Ethnic Group
(0010,2161)|X|-|Ethnic Group Code Sequence
(0010,2162)|X|-|Ethnic Groups
(0010,2180)|X|clean_desc=C|Occupation
(0010,21A0)|X|characteristics=K|Smoking Status
(0010,21B0)|X|clean_desc=C|Additional Patient History
(0010,21C0)|X|characteristics=K|Pregnancy Status
(0010,21D0)|X|long_full=K long_modified=C|Last Menstrual Date
(0010,21F0)|X|-|Patient's Religious Preference
(0010,2203)|X/Z|characteristics=K|Patient's Sex Neutered
(0010,2297)|X|-|Responsible Person
(0010,2299)|X|-|Responsible Organization
(0010,4000)|X|clean_desc=C|Patient Comments
(0012,0010)|D|-|Clinical Trial Sponsor Name
(0012,0020)|D|-|Clinical Trial Protocol ID
(0012,0021)|Z|-|Clinical Trial Protocol Name
(0012,0022)|X|-|Issuer of Clinical Trial Protocol ID
(0012,0023)|X|-|Other Clinical Trial Protocol IDs Sequence
(0012,0030)|Z|institution=K|Clinical Trial Site ID
(0012,0031)|Z|institution=K|Clinical Trial Site Name
(0012,0032)|X|-|Issuer of Clinical Trial Site ID
(0012,0040)|D|-|Clinical Trial Subject ID
(0012,0041)|X|-|Issuer of Clinical Trial Subject ID
(0012,0042)|D|-|Clinical Trial Subject Reading ID
(0012,0043)|X|-|Issuer of Clinical Trial Subject Reading ID
(0012,0050)|Z|-|Clinical Trial Time Point ID
(0012,0051)|X|clean_desc=C|Clinical Trial Time Point Description
(0012,0055)|X|-|Issuer of Clinical Trial Time Point ID
(0012,0060)|Z|institution=K|Clinical Trial Coordinating Center Name
(0012,0071)|X|-|Clinical Trial Series ID
(0012,0072)|X|clean_desc=C|Clinical Trial Series Description
(0012,0073)|X|-|Issuer of Clinical Trial Series ID
(0012,0081)|D|institution=K|Clinical Trial Protocol Ethics Committee Name
(0012,0082)|X|-|Clinical Trial Protocol Ethics Committee Approval Number
(0012,0086)|X|-|Ethics Committee Approval Effectiveness Start Date
(0012,0087)|X|-|Ethics Committee Approval Effectiveness End Date
(0014,407C)|X|-|Calibration Time
(0014,407E)|X|-|Calibration Date
(0016,002B)|X|clean_desc=C|Maker Note
(0016,004B)|X|clean_desc=C|Device Setting Description
(0016,004D)|X|-|Camera Owner Name
(0016,004E)|X|device=K|Lens Specification
(0016,004F)|X|device=K|Lens Make
(0016,0050)|X|device=K|Lens Model
(0016,0051)|X|device=K|Lens Serial Number
(0016,0070)|X|-|GPS Version ID
(0016,0071)|X|-|GPS Latitude Ref
(0016,0072)|X|-|GPS Latitude
(0016,0073)|X|-|GPS Longitude Ref
(0016,0074)|X|-|GPS Longitude
(0016,0075)|X|-|GPS Altitude Ref
(0016,0076)|X|-|GPS Altitude
(0016,0077)|X|-|GPS Time Stamp
(0016,0078)|X|-|GPS Satellites
(0016,0079)|X|-|GPS Status
(0016,007A)|X|-|GPS Measure Mode
(0016,007B)|X|-|GPS DOP
(0016,007C)|X|-|GPS Speed Ref
(0016,007D)|X|-|GPS Speed
(0016,007E)|X|-|GPS Track Ref
(0016,007F)|X|-|GPS Track
(0016,0080)|X|-|GPS Img Direction Ref
(0016,0081)|X|-|GPS Img Direction
(0016,0082)|X|-|GPS Map Datum
(0016,0083)|X|-|GPS Dest Latitude Ref
(0016,0084)|X|-|GPS Dest Latitude
(0016,0085)|X|-|GPS Dest Longitude Ref
(0016,0086)|X|-|GPS Dest Longitude
(0016,0087)|X|-|GPS Dest Bearing Ref
(0016,0088)|X|-|GPS Dest Bearing
(0016,0089)|X|-|GPS Dest Distance Ref
(0016,008A)|X|-|GPS Dest Distance
(0016,008B)|X|-|GPS Processing Method
(0016,008C)|X|-|GPS Area Information
(0016,008D)|X|long_full=K long_modified=C|GPS Date Stamp
(0016,008E)|X|-|GPS Differential
(0018,0010)|Z/D|clean_desc=C|Contrast/Bolus Agent
(0018,0027)|X|-|Intervention Drug Stop Time
(0018,0035)|X|-|Intervention Drug Start Time
(0018,1000)|X/Z/D|device=K|Device Serial Number
(0018,1002)|U|uids=K device=K|Device UID
(0018,1004)|X|device=K|Plate ID
(0018,1005)|X|device=K|Generator ID
(0018,1007)|X|device=K|Cassette ID
(0018,1008)|X|device=K|Gantry ID
(0018,1009)|X|device=K|Unique Device Identifier
(0018,100A)|X|device=K|UDI Sequence
(0018,100B)|U|uids=K device=K|Manufacturer's Device Class UID
(0018,1010)|X|-|Secondary Capture Device ID
(0018,1011)|X|-|Hardcopy Creation Device ID
(0018,1012)|X|-|Date of Secondary Capture
(0018,1014)|X|-|Time of Secondary Capture
(0018,1030)|X/D|clean_desc=C|Protocol Name
(0018,1042)|X|-|Contrast/Bolus Start Time
(0018,1043)|X|-|Contrast/Bolus Stop Time
(0018,1072)|X|-|Radiopharmaceutical Start Time
(0018,1073)|X|-|Radiopharmaceutical Stop Time
(0018,1078)|X|-|Radiopharmaceutical Start DateTime
(0018,1079)|X|-|Radiopharmaceutical Stop DateTime
(0018,11BB)|D|-|Acquisition Field Of View Label
(0018,1200)|X|-|Date of Last Calibration
(0018,1201)|X|-|Time of Last Calibration
(0018,1202)|X|-|DateTime of Last Calibration
(0018,1203)|Z|-|Calibration DateTime
(0018,1204)|X|-|Date of Manufacture
(0018,1205)|X|-|Date of Installation
(0018,1400)|X/D|clean_desc=C|Acquisition Device Processing Description
(0018,2042)|U|uids=K|Target UID
(0018,4000)|X|clean_desc=C|Acquisition Comments
(0018,5011)|X|-|Transducer Identification Sequence
(0018,700A)|X/D|device=K|Detector ID
(0018,700C)|X/D|-|Date of Last Detector Calibration
(0018,700E)|X/D|-|Time of Last Detector Calibration
(0018,9074)|D|-|Frame Acquisition DateTime
(0018,9151)|D|-|Frame Reference DateTime
(0018,9185)|X|clean_desc=C|Respiratory Motion Compensation Technique Description
(0018,9367)|D|device=K|X-Ray Source ID
(0018,9369)|D|long_full=K long_modified=C|Source Start DateTime
(0018,936A)|D|long_full=K long_modified=C|Source End DateTime
(0018,9371)|D|device=K|X-Ray Detector ID
(0018,9373)|X|device=K|X-Ray Detector Label
(0018,937B)|X|clean_desc=C|Multi-energy Acquisition Description
(0018,937F)|X|clean_desc=C|Decomposition Description
(0018,9424)|X|clean_desc=C|Acquisition Protocol Description
(0018,9516)|X/D|long_full=K long_modified=C|Start Acquisition DateTime
(0018,9517)|X/D|long_full=K long_modified=C|End Acquisition DateTime
(0018,9623)|D|-|Functional Sync Pulse
(0018,9701)|D|-|Decay Correction DateTime
(0018,9804)|D|-|Exclusion Start DateTime
(0018,9919)|Z/D|-|Instruction Performed DateTime
(0018,9937)|X|-|Requested Series Description
(0018,A002)|X|-|Contribution DateTime
(0018,A003)|X|clean_desc=C|Contribution Description
(0020,000D)|U|uids=K|Study Instance UID
(0020,000E)|U|uids=K|Series Instance UID
(0020,0010)|Z|-|Study ID
(0020,0027)|X|-|Pyramid Label
(0020,0052)|U|uids=K|Frame of Reference UID
(0020,0200)|U|uids=K|Synchronization Frame of Reference UID
(0020,3401)|X|-|Modifying Device ID
(0020,3403)|X|-|Modified Image Date
(0020,3405)|X|-|Modified Image Time
(0020,3406)|X|-|Modified Image Description
(0020,4000)|X|clean_desc=C|Image Comments
(0020,9158)|X|clean_desc=C|Frame Comments
(0020,9161)|U|uids=K|Concatenation UID
(0020,9164)|U|uids=K|Dimension Organization UID
(0028,1199)|U|uids=K|Palette Color Lookup Table UID
(0028,1214)|U|uids=K|Large Palette Color Lookup Table UID
(0028,4000)|X|-|Image Presentation Comments
(0032,0012)|X|-|Study ID Issuer
(0032,0032)|X|-|Study Verified Date
(0032,0033)|X|-|Study Verified Time
(0032,0034)|X|-|Study Read Date
(0032,0035)|X|-|Study Read Time
(0032,1000)|X|-|Scheduled Study Start Date
(0032,1001)|X|-|Scheduled Study Start Time
(0032,1010)|X|-|Scheduled Study Stop Date
(0032,1011)|X|-|Scheduled Study Stop Time
(0032,1020)|X|device=K|Scheduled Study Location
(0032,1021)|X|device=K|Scheduled Study Location AE Title
(0032,1030)|X|clean_desc=C|Reason for Study
(0032,1032)|X|-|Requesting Physician
(0032,1033)|X|-|Requesting Service
(0032,1040)|X|-|Study Arrival Date
(0032,1041)|X|-|Study Arrival Time
(0032,1050)|X|-|Study Completion Date
(0032,1051)|X|-|Study Completion Time
(0032,1060)|X/Z|clean_desc=C|Requested Procedure Description
(0032,1066)|X|clean_desc=C|Reason for Visit
(0032,1067)|X|clean_desc=C|Reason for Visit Code Sequence
(0032,1070)|X|clean_desc=C|Requested Contrast Agent
(0032,4000)|X|clean_desc=C|Study Comments
(0034,0001)|D|-|Flow Identifier Sequence
(0034,0002)|D|-|Flow Identifier
(0034,0005)|D|-|Source Identifier
(0034,0007)|D|long_full=K long_modified=C|Frame Origin Timestamp
(0038,0004)|X|-|Referenced Patient Alias Sequence
(0038,0010)|X|-|Admission ID
(0038,0011)|X|-|Issuer of Admission ID
(0038,0014)|X|-|Issuer of Admission ID Sequence
(0038,001A)|X|-|Scheduled Admission Date
(0038,001B)|X|-|Scheduled Admission Time
(0038,001C)|X|-|Scheduled Discharge Date
(0038,001D)|X|-|Scheduled Discharge Time
(0038,001E)|X|-|Scheduled Patient Institution Residence
(0038,0020)|X|long_full=K long_modified=C|Admitting Date
(0038,0021)|X|long_full=K long_modified=C|Admitting Time
(0038,0030)|X|-|Discharge Date
(0038,0032)|X|-|Discharge Time
(0038,0040)|X|clean_desc=C|Discharge Diagnosis Description
(0038,0050)|X|characteristics=C|Special Needs
(0038,0060)|X|-|Service Episode ID
(0038,0061)|X|-|Issuer of Service Episode ID
(0038,0062)|X|clean_desc=C|Service Episode Description
(0038,0064)|X|-|Issuer of Service Episode ID Sequence
(0038,0300)|X|-|Current Patient Location
(0038,0400)|X|-|Patient's Institution Residence
(0038,0500)|X|characteristics=C clean_desc=C|Patient State
(0038,4000)|X|clean_desc=C|Visit Comments
(003A,0020)|X|-|Multiplex Group Label
(003A,0203)|X|-|Channel Label
(003A,020C)|X|-|Channel Derivation Description
(003A,0310)|U|-|Multiplex Group UID
(003A,0314)|D|-|Impedance Measurement DateTime
(003A,0329)|X|-|Waveform Filter Description
(003A,032B)|X|-|Filter Lookup Table Description
(0040,0001)|X|device=K|Scheduled Station AE Title
(0040,0002)|X|long_full=K long_modified=C|Scheduled Procedure Step Start Date
(0040,0003)|X|long_full=K long_modified=C|Scheduled Procedure Step Start Time
(0040,0004)|X|long_full=K long_modified=C|Scheduled Procedure Step End Date
(0040,0005)|X|long_full=K long_modified=C|Scheduled Procedure Step End Time
(0040,0006)|X|-|Scheduled Performing Physician's Name
(0040,0007)|X|clean_desc=C|Scheduled Procedure Step Description
(0040,0009)|X|-|Scheduled Procedure Step ID
(0040,000B)|X|-|Scheduled Performing Physician Identification Sequence
(0040,0010)|X|device=K|Scheduled Station Name
(0040,0011)|X|device=K|Scheduled Procedure Step Location
(0040,0012)|X|characteristics=C|Pre-Medication
(0040,0241)|X|device=K|Performed Station AE Title
(0040,0242)|X|device=K|Performed Station Name
(0040,0243)|X|-|Performed Location
(0040,0244)|X|long_full=K long_modified=C|Performed Procedure Step Start Date
(0040,0245)|X|long_full=K long_modified=C|Performed Procedure Step Start Time
(0040,0250)|X|long_full=K long_modified=C|Performed Procedure Step End Date
(0040,0251)|X|long_full=K long_modified=C|Performed Procedure Step End Time
(0040,0253)|X|-|Performed Procedure Step ID
(0040,0254)|X|clean_desc=C|Performed Procedure Step Description
(0040,0275)|X|clean_desc=C|Request Attributes Sequence
(0040,0280)|X|clean_desc=C|Comments on the Performed Procedure Step
(0040,0310)|X|-|Comments on Radiation Dose
(0040,050A)|X|-|Specimen Accession Number
(0040,0512)|D|-|Container Identifier
(0040,0513)|Z|-|Issuer of the Container Identifier Sequence
(0040,051A)|X|clean_desc=C|Container Description
(0040,0551)|D|-|Specimen Identifier
(0040,0554)|U|uids=K|Specimen UID
(0040,0555)|X/Z|clean_struct=C|Acquisition Context Sequence
(0040,0556)|X|-|Acquisition Context Description
(0040,0562)|Z|-|Issuer of the Specimen Identifier Sequence
(0040,0600)|X|clean_desc=C|Specimen Short Description
(0040,0602)|X|clean_desc=C|Specimen Detailed Description
(0040,0610)|Z|clean_struct=C|Specimen Preparation Sequence
(0040,06FA)|X|-|Slide Identifier
(0040,1001)|X|-|Requested Procedure ID
(0040,1002)|X|clean_desc=C|Reason for the Requested Procedure
(0040,1004)|X|-|Patient Transport Arrangements
(0040,1005)|X|-|Requested Procedure Location
(0040,100A)|X|clean_desc=C|Reason for Requested Procedure Code Sequence
(0040,1010)|X|-|Names of Intended Recipients of Results
(0040,1011)|X|-|Intended Recipients of Results Identification Sequence
(0040,1101)|D|-|Person Identification Code Sequence
(0040,1102)|X|-|Person's Address
(0040,1103)|X|-|Person's Telephone Numbers
(0040,1104)|X|-|Person's Telecom Information
(0040,1400)|X|clean_desc=C|Requested Procedure Comments
(0040,2001)|X|clean_desc=C|Reason for the Imaging Service Request
(0040,2004)|X|-|Issue Date of Imaging Service Request
(0040,2005)|X|-|Issue Time of Imaging Service Request
(0040,2008)|X|-|Order Entered By
(0040,2009)|X|-|Order Enterer's Location
(0040,2010)|X|-|Order Callback Phone Number
(0040,2011)|X|-|Order Callback Telecom Information
(0040,2016)|Z|-|Placer Order Number / Imaging Service Request
(0040,2017)|Z|-|Filler Order Number / Imaging Service Request
(0040,2400)|X|clean_desc=C|Imaging Service Request Comments
(0040,3001)|X|-|Confidentiality Constraint on Patient Data Description
(0040,4005)|X|long_full=K long_modified=C|Scheduled Procedure Step Start DateTime
(0040,4008)|X|long_full=K long_modified=C|Scheduled Procedure Step Expiration DateTime
(0040,4010)|X|long_full=K long_modified=C|Scheduled Procedure Step Modification DateTime
(0040,4011)|X|long_full=K long_modified=C|Expected Completion DateTime
(0040,4023)|U|uids=K|Referenced General Purpose Scheduled Procedure Step Transaction UID
(0040,4025)|X|device=K|Scheduled Station Name Code Sequence
(0040,4027)|X|device=K|Scheduled Station Geographic Location Code Sequence
(0040,4028)|X|device=K|Performed Station Name Code Sequence
(0040,4030)|X|device=K|Performed Station Geographic Location Code Sequence
(0040,4034)|X|-|Scheduled Human Performers Sequence
(0040,4035)|X|-|Actual Human Performers Sequence
(0040,4036)|X|-|Human Performer's Organization
(0040,4037)|X|-|Human Performer's Name
(0040,4050)|X|long_full=K long_modified=C|Performed Procedure Step Start DateTime
(0040,4051)|X|long_full=K long_modified=C|Performed Procedure Step End DateTime
(0040,4052)|X|long_full=K long_modified=C|Procedure Step Cancellation DateTime
(0040,A023)|X|-|Findings Group Recording Date (Trial)
(0040,A024)|X|-|Findings Group Recording Time (Trial)
(0040,A027)|D|-|Verifying Organization
(0040,A030)|D|-|Verification DateTime
(0040,A032)|X/D|-|Observation DateTime
(0040,A033)|X|-|Observation Start DateTime
(0040,A034)|X|-|Effective Start DateTime
(0040,A035)|X|-|Effective Stop DateTime
(0040,A073)|D|-|Verifying Observer Sequence
(0040,A075)|D|-|Verifying Observer Name
(0040,A078)|X|-|Author Observer Sequence
(0040,A07A)|X|-|Participant Sequence
(0040,A07C)|X|-|Custodial Organization Sequence
(0040,A082)|Z|-|Participation DateTime
(0040,A088)|Z|-|Verifying Observer Identification Code Sequence
(0040,A110)|X|-|Date of Document or Verbal Transaction (Trial)
(0040,A112)|X|-|Time of Document Creation or Verbal Transaction (Trial)
(0040,A120)|D|-|DateTime
(0040,A121)|D|-|Date
(0040,A122)|D|-|Time
(0040,A123)|D|-|Person Name
(0040,A124)|U|-|UID
(0040,A13A)|D|-|Referenced DateTime
(0040,A171)|U|uids=K|Observation UID
(0040,A172)|U|uids=K|Referenced Observation UID (Trial)
(0040,A192)|X|long_full=K long_modified=C|Observation Date (Trial)
(0040,A193)|X|long_full=K long_modified=C|Observation Time (Trial)
(0040,A307)|X|-|Current Observer (Trial)
(0040,A352)|X|-|Verbal Source (Trial)
(0040,A353)|X|-|Address (Trial)
(0040,A354)|X|-|Telephone Number (Trial)
(0040,A358)|X|-|Verbal Source Identifier Code Sequence (Trial)
(0040,A402)|U|uids=K|Observation Subject UID (Trial)
(0040,A730)|D|clean_struct=C|Content Sequence
(0040,B020)|X/D|-|Waveform Annotation Sequence
(0040,B034)|X|-|Annotation DateTime
(0040,B036)|X|-|Segment Definition DateTime
(0040,B03B)|X|-|Montage Name
(0040,B03F)|X|-|Montage Channel Label
(0040,DB06)|X|-|Template Version
(0040,DB07)|X|-|Template Local Version
(0040,DB0C)|U|uids=K|Template Extension Organization UID
(0040,DB0D)|U|uids=K|Template Extension Creator UID
(0040,E004)|X|-|HL7 Document Effective Time
(0040,E012)|X|-|Display URI
(0042,0011)|D|-|Encapsulated Document
(0044,0004)|X|-|Approval Status DateTime
(0044,000B)|X|-|Product Expiration DateTime
(0044,0010)|X|-|Substance Administration DateTime
(0044,0104)|D|-|Assertion DateTime
(0044,0105)|X|-|Assertion Expiration DateTime
(0050,001B)|X|-|Container Component ID
(0050,0020)|X|device=K|Device Description
(0050,0021)|X|clean_desc=C|Long Device Description
(0062,0021)|U|uids=K|Tracking UID
(0064,0003)|U|-|Source Frame of Reference UID
(0068,6226)|D|-|Effective DateTime
(0068,6270)|D|-|Information Issue DateTime
(006A,0003)|D|-|Annotation Group UID
(006A,0005)|D|-|Annotation Group Label
(006A,0006)|X|-|Annotation Group Description
(0070,0001)|D|clean_graph=C|Graphic Annotation Sequence
(0070,0006)|D|-|Unformatted Text Value
(0070,0082)|X|-|Presentation Creation Date
(0070,0083)|X|-|Presentation Creation Time
(0070,0084)|Z/D|-|Content Creator's Name
(0070,0086)|X|-|Content Creator's Identification Code Sequence
(0070,031A)|U|uids=K|Fiducial UID
(0070,1101)|U|uids=K|Presentation Display Collection UID
(0070,1102)|U|uids=K|Presentation Sequence Collection UID
(0072,000A)|D|-|Hanging Protocol Creation DateTime
(0072,005E)|D|-|Selector AE Value
(0072,005F)|D|-|Selector AS Value
(0072,0061)|D|-|Selector DA Value
(0072,0063)|D|-|Selector DT Value
(0072,0065)|D|-|Selector OB Value
(0072,0066)|D|-|Selector LO Value
(0072,0068)|D|-|Selector LT Value
(0072,006A)|D|-|Selector PN Value
(0072,006B)|D|-|Selector TM Value
(0072,006C)|D|-|Selector SH Value
(0072,006D)|D|-|Selector UN Value
(0072,006E)|D|-|Selector ST Value
(0072,0070)|D|-|Selector UT Value
(0072,0071)|D|-|Selector UR Value
(0074,1234)|X|-|Receiving AE
(0074,1236)|X|-|Requesting AE
(0088,0140)|U|uids=K|Storage Media File-set UID
(0088,0200)|X|-|Icon Image Sequence(see Note 11)
(0088,0904)|X|-|Topic Title
(0088,0906)|X|-|Topic Subject
(0088,0910)|X|-|Topic Author
(0088,0912)|X|-|Topic Keywords
(0100,0420)|X|-|SOP Authorization DateTime
(0400,0100)|U|-|Digital Signature UID
(0400,0105)|D|-|Digital Signature DateTime
(0400,0115)|D|-|Certificate of Signer
(0400,0310)|X|-|Certified Timestamp
(0400,0402)|X|-|Referenced Digital Signature Sequence
(0400,0403)|X|-|Referenced SOP Instance MAC Sequence
(0400,0404)|X|-|MAC
(0400,0550)|X|-|Modified Attributes Sequence
(0400,0551)|X|-|Nonconforming Modified Attributes Sequence
(0400,0552)|X|-|Nonconforming Data Element Value
(0400,0561)|X|-|Original Attributes Sequence
(0400,0562)|D|-|Attribute Modification DateTime
(0400,0563)|D|-|Modifying System
(0400,0564)|Z|-|Source of Previous Values
(0400,0565)|D|-|Reason for the Attribute Modification
(0400,0600)|X|-|Instance Origin Status
(2030,0020)|X|-|Text String
(2100,0040)|X|-|Creation Date
(2100,0050)|X|-|Creation Time
(2100,0070)|X|-|Originator
(2100,0140)|D|-|Destination AE
(2200,0002)|X/Z|clean_desc=C|Label Text
(2200,0005)|X/Z|-|Barcode Value
(3002,0121)|X|-|Position Acquisition Template Name
(3002,0123)|X|-|Position Acquisition Template Description
(3006,0002)|D|-|Structure Set Label
(3006,0004)|X|-|Structure Set Name
(3006,0006)|X|-|Structure Set Description
(3006,0008)|Z|-|Structure Set Date
(3006,0009)|Z|-|Structure Set Time
(3006,0024)|U|uids=K|Referenced Frame of Reference UID
(3006,0026)|Z|-|ROI Name
(3006,0028)|X|-|ROI Description
(3006,002D)|X|-|ROI DateTime
(3006,002E)|X|-|ROI Observation DateTime
(3006,0038)|X|-|ROI Generation Description
(3006,004D)|X|-|ROI Creator Sequence
(3006,004E)|X|-|ROI Interpreter Sequence
(3006,0085)|X|-|ROI Observation Label
(3006,0088)|X|-|ROI Observation Description
(3006,00A6)|Z|-|ROI Interpreter
(3006,00C2)|U|uids=K|Related Frame of Reference UID
(3008,0024)|D|-|Treatment Control Point Date
(3008,0025)|D|-|Treatment Control Point Time
(3008,0054)|X/D|long_full=K long_modified=C|First Treatment Date
(3008,0056)|X/D|long_full=K long_modified=C|Most Recent Treatment Date
(3008,0105)|X/Z|device=K|Source Serial Number
(3008,0162)|D|-|Safe Position Exit Date
(3008,0164)|D|-|Safe Position Exit Time
(3008,0166)|D|-|Safe Position Return Date
(3008,0168)|D|-|Safe Position Return Time
(3008,0250)|X/D|long_full=K long_modified=C|Treatment Date
(3008,0251)|X/D|long_full=K long_modified=C|Treatment Time
(300A,0002)|D|clean_desc=C|RT Plan Label
(300A,0003)|X|clean_desc=C|RT Plan Name
(300A,0004)|X|clean_desc=C|RT Plan Description
(300A,0006)|X/D|long_full=K long_modified=C|RT Plan Date
(300A,0007)|X/D|long_full=K long_modified=C|RT Plan Time
(300A,000B)|X|-|Treatment Sites
(300A,000E)|X|clean_desc=C|Prescription Description
(300A,0013)|U|uids=K|Dose Reference UID
(300A,0016)|X|clean_desc=C|Dose Reference Description
(300A,0054)|U|-|Table Top Position Alignment UID
(300A,0072)|X|clean_desc=C|Fraction Group Description
(300A,0083)|U|uids=K|Referenced Dose Reference UID
(300A,00B2)|X/Z|device=K|Treatment Machine Name
(300A,00C3)|X|clean_desc=C|Beam Description
(300A,00DD)|X|clean_desc=C|Bolus Description
(300A,0196)|X|clean_desc=C|Fixation Device Description
(300A,01A6)|X|clean_desc=C|Shielding Device Description
(300A,01B2)|X|clean_desc=C|Setup Technique Description
(300A,0216)|X|device=K|Source Manufacturer
(300A,022C)|D|-|Source Strength Reference Date
(300A,022E)|D|-|Source Strength Reference Time
(300A,02EB)|X|clean_desc=C|Compensator Description
(300A,0608)|D|clean_desc=C|Treatment Position Group Label
(300A,0609)|U|uids=K|Treatment Position Group UID
(300A,0611)|Z|-|RT Accessory Holder Slot ID
(300A,0615)|Z|-|RT Accessory Device Slot ID
(300A,0619)|D|clean_desc=C|Radiation Dose Identification Label
(300A,0623)|D|clean_desc=C|Radiation Dose In-Vivo Measurement Label
(300A,062A)|D|clean_desc=C|RT Tolerance Set Label
(300A,0650)|U|uids=K|Patient Setup UID
(300A,0676)|X|clean_desc=C|Equipment Frame of Reference Description
(300A,067C)|D|clean_desc=C|Radiation Generation Mode Label
(300A,067D)|Z|clean_desc=C|Radiation Generation Mode Description
(300A,0700)|U|-|Treatment Session UID
(300A,0734)|D|-|Treatment Tolerance Violation Description
(300A,0736)|D|-|Treatment Tolerance Violation DateTime
(300A,073A)|D|-|Recorded RT Control Point DateTime
(300A,0741)|D|-|Interlock DateTime
(300A,0742)|D|-|Interlock Description
(300A,0760)|D|-|Override DateTime
(300A,0783)|D|-|Interlock Origin Description
(300A,0785)|U|-|Referenced Treatment Position Group UID
(300A,078E)|X|-|Patient Treatment Preparation Procedure Parameter Description
(300A,0792)|X|-|Patient Treatment Preparation Method Description
(300A,0794)|X|-|Patient Setup Photo Description
(300A,079A)|X|-|Displacement Reference Label
(300C,0113)|X|clean_desc=C|Reason for Omission Description
(300C,0127)|D|-|Beam Hold Transition DateTime
(300E,0004)|Z|-|Review Date
(300E,0005)|Z|-|Review Time
(300E,0008)|X/Z|-|Reviewer Name
(3010,0006)|U|uids=K|Conceptual Volume UID
(3010,000B)|U|uids=K|Referenced Conceptual Volume UID
(3010,000F)|Z|clean_desc=C|Conceptual Volume Combination Description
(3010,0013)|U|uids=K|Constituent Conceptual Volume UID
(3010,0015)|U|uids=K|Source Conceptual Volume UID
(3010,0017)|Z|clean_desc=C|Conceptual Volume Description
(3010,001B)|Z|-|Device Alternate Identifier
(3010,002D)|D|device=K|Device Label
(3010,0031)|U|uids=K|Referenced Fiducials UID
(3010,0033)|D|clean_desc=C|User Content Label
(3010,0034)|D|clean_desc=C|User Content Long Label
(3010,0035)|D|clean_desc=C|Entity Label
(3010,0036)|X|clean_desc=C|Entity Name
(3010,0037)|X|clean_desc=C|Entity Description
(3010,0038)|D|clean_desc=C|Entity Long Label
(3010,003B)|U|uids=K|RT Treatment Phase UID
(3010,0043)|Z|device=K|Manufacturer's Device Identifier
(3010,004C)|X/D|long_full=K long_modified=C|Intended Phase Start Date
(3010,004D)|X/D|long_full=K long_modified=C|Intended Phase End Date
(3010,0054)|D|clean_desc=C|RT Prescription Label
(3010,0056)|X/D|clean_desc=C|RT Treatment Approach Label
(3010,005A)|Z|clean_desc=C|RT Physician Intent Narrative
(3010,005C)|Z|clean_desc=C|Reason for Superseding
(3010,0061)|X|clean_desc=C|Prior Treatment Dose Description
(3010,006E)|U|uids=K|Dosimetric Objective UID
(3010,006F)|U|uids=K|Referenced Dosimetric Objective UID
(3010,0077)|X/D|clean_desc=C|Treatment Site
(3010,007A)|Z|clean_desc=C|Treatment Technique Notes
(3010,007B)|Z|clean_desc=C|Prescription Notes
(3010,007F)|Z|clean_desc=C|Fractionation Notes
(3010,0081)|Z|clean_desc=C|Prescription Notes Sequence
(3010,0085)|X|-|Intended Fraction Start Time
(4000,0010)|X|-|Arbitrary
(4000,4000)|X|-|Text Comments
(4008,0040)|X|-|Results ID
(4008,0042)|X|-|Results ID Issuer
(4008,0100)|X|-|Interpretation Recorded Date
(4008,0101)|X|-|Interpretation Recorded Time
(4008,0102)|X|-|Interpretation Recorder
(4008,0108)|X|-|Interpretation Transcription Date
(4008,0109)|X|-|Interpretation Transcription Time
(4008,010A)|X|-|Interpretation Transcriber
(4008,010B)|X|clean_desc=C|Interpretation Text
(4008,010C)|X|-|Interpretation Author
(4008,0111)|X|-|Interpretation Approver Sequence
(4008,0112)|X|-|Interpretation Approval Date
(4008,0113)|X|-|Interpretation Approval Time
(4008,0114)|X|-|Physician Approving Interpretation
(4008,0115)|X|clean_desc=C|Interpretation Diagnosis Description
(4008,0118)|X|-|Results Distribution List Sequence
(4008,0119)|X|-|Distribution Name
(4008,011A)|X|-|Distribution Address
(4008,0200)|X|-|Interpretation ID
(4008,0202)|X|-|Interpretation ID Issuer
(4008,0300)|X|clean_desc=C|Impressions
(4008,4000)|X|clean_desc=C|Results Comments
(50XX,XXXX)|X|clean_graph=C|Curve Data
(60XX,3000)|X|clean_graph=C|Overlay Data
(60XX,4000)|X|clean_graph=C|Overlay Comments
(FFFA,FFFA)|X|-|Digital Signatures Sequence
(FFFC,FFFC)|X|-|Data Set Trailing Padding
(GGGG,EEEE)|X|safe_private=C|Private attributes (GGGG odd)
"""


ROWS: tuple[Row, ...] = _parse(_ROWS)


def _write_rows(anonymizer_py: str, standard_json: str) -> str:  # pragma: no cover - a maintenance tool
    """The ``_ROWS`` text from the two packages' files (see the module docstring)."""
    import ast
    import json
    from pathlib import Path

    categories = ("D_TAGS", "Z_TAGS", "X_TAGS", "U_TAGS", "Z_D_TAGS", "X_Z_TAGS", "X_D_TAGS",
                  "X_Z_D_TAGS", "X_Z_U_STAR_TAGS")
    src = Path(anonymizer_py).read_text()
    # the name is the comment after each tuple; a tuple may span lines
    flat = re.sub(r"\(\s*\n\s*(0x[0-9A-Fa-f]{4}),\s*\n\s*(0x[0-9A-Fa-f]{4}),?\s*\n\s*\)", r"(\1, \2)", src)
    names = {tuple(int(x, 16) for x in re.split(r",\s*", m.group(1))): m.group(2).strip()
             for m in re.finditer(r"\((0x[0-9A-Fa-f]{4}(?:,\s*0x[0-9A-Fa-f]{4}){1,3}),?\s*\),?\s*#\s*(.+)", flat)}
    basic: dict[tuple, str] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in categories:
            code = node.targets[0].id[:-5].replace("_STAR", "*").replace("_", "/")
            for elt in node.value.elts:
                basic[tuple(ast.literal_eval(elt))] = code

    def text(t: tuple) -> str:
        if len(t) == 2:
            return f"({t[0]:04X},{t[1]:04X})"
        value, mask = f"{t[0]:04X}{t[1]:04X}", f"{t[2]:04X}{t[3]:04X}"
        s = "".join(v if m == "F" else "X" for v, m in zip(value, mask))
        return f"({s[:4]},{s[4:]})"

    keys = {"rtnSafePrivOpt": "safe_private", "rtnUIDsOpt": "uids", "rtnDevIdOpt": "device",
            "rtnInstIdOpt": "institution", "rtnPatCharsOpt": "characteristics",
            "rtnLongFullDatesOpt": "long_full", "rtnLongModifDatesOpt": "long_modified",
            "cleanDescOpt": "clean_desc", "cleanStructContOpt": "clean_struct",
            "cleanGraphOpt": "clean_graph"}
    options, private = {}, None
    for row in json.loads(Path(standard_json).read_text()):
        pairs = " ".join(f"{keys[k]}={row[k]}" for k in keys if k in row) or "-"
        if "ODD" in row["tag"].upper():
            private = ("(GGGG,EEEE)", row["basicProfile"], pairs, "Private attributes (GGGG odd)")
        else:
            options[row["tag"].upper()] = pairs
    rows = sorted((text(t), code, options.pop(text(t), "-"), names[t]) for t, code in basic.items())
    if options:
        raise ValueError(f"rows of the 2020 edition missing from the newer list: {sorted(options)}")
    return "\n".join("|".join(r) for r in [*rows, private]) + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(_write_rows(sys.argv[1], sys.argv[2]), end="")


# --- notices of the sources ---------------------------------------------------------------------
#
# dicom-anonymizer (tags, names, Basic Profile actions):
#
# Copyright 2020, Kitware Europe
#
# Redistribution and use in source and binary forms, with or without modification,
# are permitted provided that the following conditions are met:
#
# 1. Redistributions of source code must retain the above copyright notice,
# this list of conditions and the following disclaimer.
#
# 2. Redistributions in binary form must reproduce the above copyright notice,
# this list of conditions and the following disclaimer in the documentation
# and/or other materials provided with the distribution.
#
# 3. Neither the name of the copyright holder nor the names of its contributors
# may be used to endorse or promote products derived from this software without
# specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND
# ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED
# WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED.
# IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT,
# INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING,
# BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
# DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF
# LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE
# OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED
# OF THE POSSIBILITY OF SUCH DAMAGE.
#
# dicom-standard (option columns, the private-attributes row):
#
# Copyright (c) 2017 Innolitics, LLC.
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of
# this software and associated documentation files (the "Software"), to deal in
# the Software without restriction, including without limitation the rights to
# use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
# of the Software, and to permit persons to whom the Software is furnished to do
# so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
