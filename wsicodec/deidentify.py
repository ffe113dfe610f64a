"""De-identification (``compress --deidentify``): which slide properties and associated
images a shared copy leaves out, and why.

:func:`deidentify` takes a slide's properties (OpenSlide's names: ``aperio.Date``,
``tiff.DateTime``, ``dicom.PatientName``, ...) and its vendor, and returns what to keep
and the names of what it removed. Values are never recorded anywhere, only names.

What is removed, in this order (docs/deidentify.md has the table per vendor):

1. the properties named in :data:`VENDOR_PROPERTIES` (each with its reason), for the
   slide's vendor and for every vendor (``"*"``);
2. for every vendor but DICOM, properties whose name matches one of
   :data:`NAME_PATTERNS` (dates, times, people, file names, serial numbers, barcodes,
   identifiers, free text): a vendor without its own list still loses the obvious ones;
3. for DICOM, attributes whose keyword (any part of the flattened name, e.g. the
   ``PatientName`` of ``dicom.PatientName`` or ``OtherPatientIDsSequence[0]``) matches
   :data:`DICOM_KEYWORD_PATTERNS`; unique identifiers (``...UID``) other than the
   standard's own class / transfer-syntax UIDs are kept, replaced by fresh
   ``2.25.<uuid>`` UIDs (one new UID per old one, so references between attributes
   still agree);
4. the properties that describe an associated image that is dropped
   (``openslide.associated.label.width``, ...);
5. a safety net: any kept property whose value contains the value of a removed one
   (:data:`ECHO_MIN_CHARS` characters or more: a file name echoed in a free-text field
   no rule knows) is removed too, until none does.

Associated images: only those named in :data:`KEPT_ASSOCIATED_IMAGES` (the thumbnail:
a downsampled picture of the tissue) are kept; the label (often the patient's name and
a barcode), the macro (a photograph of the whole glass slide, label included) and any
other image a vendor adds are dropped.

This is the metadata and the associated images: the tissue pixels are kept as they are
(writing on a slide, a pen mark with a name in the scanned area, stays). The output's
file name is the caller's choice.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

#: version of these rules, recorded in the container with what they removed
RULES = "wsicodec-deidentify-1"

#: associated images a de-identified copy keeps; every other one is dropped
KEPT_ASSOCIATED_IMAGES = ("thumbnail",)
#: the associated images OpenSlide names that are dropped, and why (any other name is
#: dropped too)
DROPPED_ASSOCIATED_IMAGES = {
    "label": "the slide's label: often the patient's name, a case number and a barcode",
    "macro": "a photograph of the whole glass slide, label included",
}

#: vendor ("*": every vendor) -> property name -> why it is removed
VENDOR_PROPERTIES: dict[str, dict[str, str]] = {
    "*": {
        "openslide.comment": "free text (the TIFF ImageDescription for Aperio and generic "
                             "TIFF): carries file name, date, user, scanner id",
        "openslide.quickhash-1": "a hash identifying the original file",
        "wsicodec.source-quickhash-1": "the source's openslide.quickhash-1, as a container "
                                       "reports it: a hash identifying the original file",
        "tiff.ImageDescription": "free text; Aperio writes Filename, Date, Time, User and "
                                 "the scanner's id into it",
        "tiff.DateTime": "date and time the file was written",
        "tiff.Artist": "the person who made the image",
        "tiff.HostComputer": "the computer's name",
        "tiff.DocumentName": "usually a file name",
        "tiff.PageName": "may be a file or case name",
        "tiff.Copyright": "may name a person or institution",
    },
    "aperio": {
        "aperio.Filename": "the scan's file name (often the case or patient id)",
        "aperio.Date": "scan date",
        "aperio.Time": "scan time",
        "aperio.Time Zone": "where the scan was made",
        "aperio.User": "the operator's account id",
        "aperio.ImageID": "the image's id in the Aperio database",
        "aperio.ScanScope ID": "the scanner's serial name",
        "aperio.DSR ID": "the image server's name",
        "aperio.Barcode": "the label's barcode text",
        "aperio.Title": "free text title",
    },
    "hamamatsu": {
        "hamamatsu.Created": "scan date",
        "hamamatsu.Updated": "date the file was last changed",
        "hamamatsu.Reference": "the slide's reference (barcode / case) text",
        "hamamatsu.NDP.S/N": "the scanner's serial number",
        "hamamatsu.Macro.S/N": "the macro camera's serial number",
        "hamamatsu.MHLN[0].24bit": "undocumented per-device code (serial / licence-like)",
        "hamamatsu.MHLN[0].36bit": "undocumented per-device code (serial / licence-like)",
        "hamamatsu.MHLN[1].24bit": "undocumented per-device code (serial / licence-like)",
        "hamamatsu.MHLN[1].36bit": "undocumented per-device code (serial / licence-like)",
        "hamamatsu.MHLN[2].24bit": "undocumented per-device code (serial / licence-like)",
        "hamamatsu.MHLN[2].36bit": "undocumented per-device code (serial / licence-like)",
    },
    "dicom": {
        "dicom.PatientName": "the patient",
        "dicom.PatientID": "the patient's id",
        "dicom.PatientBirthDate": "the patient's birth date",
        "dicom.PatientSex": "a quasi-identifier",
        "dicom.PatientAge": "a quasi-identifier",
        "dicom.AccessionNumber": "the order's id",
        "dicom.StudyID": "the study's id",
        "dicom.StudyDate": "a date",
        "dicom.StudyTime": "a time",
        "dicom.SeriesDate": "a date",
        "dicom.ContentDate": "a date",
        "dicom.ContentTime": "a time",
        "dicom.AcquisitionDateTime": "a date",
        "dicom.ReferringPhysicianName": "a person",
        "dicom.InstitutionName": "where the patient was seen",
        "dicom.DeviceSerialNumber": "the scanner's serial number",
        "dicom.ContainerIdentifier": "the slide's id (its barcode)",
        "dicom.SeriesDescription": "free text",
        "dicom.StudyDescription": "free text",
    },
}

#: every vendor but DICOM: a property whose name (without the vendor prefix) matches one
#: of these (case-insensitive) is removed -> why
NAME_PATTERNS: dict[str, str] = {
    r"date|time": "dates and times",
    r"user|operator|patient|person|physician|artist|author": "people",
    r"file ?name|path": "file names",
    r"serial|s/n": "device serial numbers",
    r"barcode": "barcode text",
    r"id$|uid|guid": "identifiers",
    r"name|host|institution|accession|reference|address": "names of people, places, "
                                                          "machines, cases",
    r"comment|description|title|label|note": "free text",
}

#: DICOM attribute keywords (CamelCase, case-sensitive) that are removed, as patterns
#: matched against each part of the flattened property name -> why
DICOM_KEYWORD_PATTERNS: dict[str, str] = {
    r"Patient|Person|Physician|Operator|Referring|Requesting|Admitting|Responsible|"
    r"Performing|Verifying|Occupation|Ethnic|Religious|Military|Insurance|Allerg|Medical|"
    r"Pregnancy|Residence|Country|Region": "people and what describes them",
    r"Name": "names (of people, stations, protocols)",
    r"Date|Time": "dates and times",
    r"Accession|Identifier|ID$|Issuer|Trial": "identifiers",
    r"Institution|Station|Department|Address|Telephone": "places and machines",
    r"SerialNumber": "device serial numbers",
    r"Comment|Description|Text|Label|Barcode": "free text and label text",
}
#: DICOM keywords kept although a pattern matches them: they describe equipment and
#: software, not people
DICOM_KEEP = {"ManufacturerModelName", "ImplementationVersionName", "SoftwareVersions"}
#: DICOM UID keywords kept as they are: they name a kind of object or an encoding, the
#: same for every file
DICOM_KEEP_UIDS = {"SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                   "ImplementationClassUID", "ReferencedSOPClassUID", "CodingSchemeUID",
                   "MappingResourceUID", "ContextGroupExtensionCreatorUID"}
#: the DICOM standard's UID root: such a UID is a class or syntax, never an instance
DICOM_STANDARD_ROOT = "1.2.840.10008."

#: the safety net (rule 5) matches removed values of at least this many characters
ECHO_MIN_CHARS = 5

_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class Deidentified:
    """What :func:`deidentify` decided."""

    properties: dict[str, str]                 #: the properties to keep (UIDs replaced)
    removed_properties: tuple[str, ...]        #: names removed, sorted
    replaced_uids: tuple[str, ...]             #: names whose UID value was replaced, sorted
    removed_associated_images: tuple[str, ...]  #: associated images dropped

    def record(self) -> dict:
        """The JSON record a container keeps (names only, never values)."""
        return {"rules": RULES, "removed_properties": list(self.removed_properties),
                "replaced_uids": list(self.replaced_uids),
                "removed_associated_images": list(self.removed_associated_images),
                "removed_source_name": True}


def new_uid() -> str:
    """A fresh DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def dropped_associated_images(names: Iterable[str]) -> list[str]:
    """The associated images a de-identified copy leaves out: all but the thumbnail."""
    return [n for n in names if n not in KEPT_ASSOCIATED_IMAGES]


def _keywords(name: str) -> list[str]:
    """The DICOM keywords in a flattened OpenSlide name, indices dropped:
    ``dicom.A[0].B`` -> ["A", "B"]."""
    rest = name.split(".", 1)[1] if name.startswith("dicom.") else name
    return [_INDEX.sub("", part) for part in rest.split(".")]


def removal_reason(name: str, vendor: str) -> str | None:
    """Why property ``name`` of a ``vendor`` slide is removed (rules 1-3), or None if it
    is kept (a DICOM UID that is replaced counts as kept)."""
    for v in ("*", vendor):
        reason = VENDOR_PROPERTIES.get(v, {}).get(name)
        if reason is not None:
            return reason
    if name.startswith("dicom."):
        keywords = _keywords(name)
        if keywords[-1].endswith("UID"):
            return None                    # replaced or kept, see _is_instance_uid
        for kw in keywords:
            kw = kw[:-len("Sequence")] if kw.endswith("Sequence") else kw
            if kw in DICOM_KEEP:
                continue
            for pattern, reason in DICOM_KEYWORD_PATTERNS.items():
                if re.search(pattern, kw):
                    return f"{reason} ({kw})"
        return None
    if name.startswith("openslide."):
        return None   # OpenSlide's own geometry (mpp, levels, bounds); see "*" above
    bare = name.split(".", 1)[1] if "." in name else name
    for pattern, reason in NAME_PATTERNS.items():
        if re.search(pattern, bare, re.IGNORECASE):
            return reason
    return None


def _is_instance_uid(name: str, value: str) -> bool:
    if not name.startswith("dicom."):
        return False
    kw = _keywords(name)[-1]
    return (kw.endswith("UID") and kw not in DICOM_KEEP_UIDS
            and not value.startswith(DICOM_STANDARD_ROOT))


def deidentify(properties: Mapping[str, str], vendor: str,
               associated_images: Iterable[str] = ()) -> Deidentified:
    """Decide what a de-identified copy keeps of a slide's properties and associated
    images (see the module docstring for the rules)."""
    props = {str(k): str(v) for k, v in properties.items()}
    dropped = dropped_associated_images(associated_images)
    dropped_prefixes = tuple(f"openslide.associated.{n}." for n in
                             set(dropped) | set(DROPPED_ASSOCIATED_IMAGES))
    removed: dict[str, str] = {}          # name -> value (values never leave this function)
    kept: dict[str, str] = {}
    for name, value in props.items():
        if removal_reason(name, vendor) is not None or name.startswith(dropped_prefixes):
            removed[name] = value
        else:
            kept[name] = value
    new: dict[str, str] = {}               # old UID -> new UID
    replaced: list[str] = []
    for name, value in kept.items():
        if _is_instance_uid(name, value):
            removed_value = value.strip()
            if removed_value not in new:
                new[removed_value] = new_uid()
            kept[name] = new[removed_value]
            replaced.append(name)
    # the safety net: a kept value that echoes a removed one (or an old UID) goes too
    secrets = {v.strip() for v in removed.values()} | set(new)
    while True:
        long_ones = [s for s in secrets if len(s) >= ECHO_MIN_CHARS]
        echo = [n for n, v in kept.items() if n not in replaced
                and any(s in v for s in long_ones)]
        if not echo:
            break
        for n in echo:
            secrets.add(kept[n].strip())
            removed[n] = kept.pop(n)
    return Deidentified(kept, tuple(sorted(removed)), tuple(sorted(replaced)), tuple(dropped))


def deidentify_properties(properties: Mapping[str, str], vendor: str
                          ) -> tuple[dict[str, str], list[str]]:
    """(the properties a de-identified copy keeps, the names of those it removes).
    DICOM instance UIDs are kept with fresh values (:func:`deidentify` says which)."""
    d = deidentify(properties, vendor)
    return d.properties, list(d.removed_properties)


__all__ = ["deidentify", "deidentify_properties", "dropped_associated_images", "new_uid",
           "removal_reason", "Deidentified", "KEPT_ASSOCIATED_IMAGES",
           "DROPPED_ASSOCIATED_IMAGES", "VENDOR_PROPERTIES", "NAME_PATTERNS",
           "DICOM_KEYWORD_PATTERNS", "RULES"]
