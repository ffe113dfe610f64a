"""compress --deidentify (issue #26) on every shared slide: the label and macro are gone,
no kept property (nor any byte of the container) holds a removed value, DICOM UIDs are
new, and ``info`` says what was removed (names only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REAL_SLIDES, need
from wsicodec.cli import build_parser, main
from wsicodec.container import open_container
from wsicodec.deidentify import (ECHO_MIN_CHARS, deidentify, deidentify_properties,
                                 removal_reason)

FAST = ("--codec", "jpegxl", "--option", "effort=1", "--workers", "1", "--quiet")

#: per shared slide: properties that must be removed, and ones that must stay as they are
EXPECT = {
    "svs-jpeg": ({"aperio.Filename", "aperio.Date", "aperio.Time", "aperio.User",
                  "aperio.ImageID", "aperio.ScanScope ID", "tiff.ImageDescription",
                  "openslide.comment", "openslide.quickhash-1"},
                 {"aperio.AppMag", "aperio.MPP", "openslide.mpp-x", "openslide.vendor"}),
    "svs-jpeg2000": ({"tiff.ImageDescription", "openslide.comment", "openslide.quickhash-1"},
                     {"aperio.ICC Profile", "openslide.vendor"}),
    "ndpi": ({"hamamatsu.Created", "hamamatsu.Updated", "hamamatsu.NDP.S/N",
              "hamamatsu.Macro.S/N", "tiff.DateTime", "openslide.quickhash-1"},
             {"hamamatsu.SourceLens", "tiff.Make", "tiff.Model", "tiff.Software",
              "openslide.mpp-x", "openslide.objective-power"}),
    "generic-tiff": ({"openslide.quickhash-1"}, {"openslide.mpp-x", "tiff.XResolution"}),
    "dicom": ({"dicom.ContentDate", "dicom.ContentTime", "dicom.SeriesDescription",
               "openslide.quickhash-1"},
              {"dicom.SOPClassUID", "dicom.TransferSyntaxUID", "dicom.ImplementationClassUID",
               "dicom.TotalPixelMatrixColumns", "openslide.mpp-x"}),
}
TILE = {"generic-tiff": "64"}


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def secrets(removed: dict[str, str]) -> set[str]:
    return {v.strip() for v in removed.values() if len(v.strip()) >= ECHO_MIN_CHARS}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_deidentify_every_shared_slide(tmp_path: Path, capsys, name: str) -> None:
    import openslide

    src = need(REAL_SLIDES[name])
    with openslide.OpenSlide(str(src)) as s:
        original = dict(s.properties)
        original_assoc = list(s.associated_images)
    box = tmp_path / "d.zarr.zip"
    code, _, err = run(capsys, "compress", src, box, "--deidentify", "--tile-size",
                       TILE.get(name, "512"), *FAST)
    assert code == 0, err
    with open_container(box) as c:
        kept = dict(c.metadata.properties)
        assoc = c.associated_image_names()
        assert c.metadata.source_name is None
        record = c.metadata.deidentified
    must_go, must_stay = EXPECT[name]
    removed = {k: v for k, v in original.items() if k not in kept}
    replaced = {k: v for k, v in original.items() if k in kept and kept[k] != v}
    assert must_go <= set(removed), must_go - set(removed)
    assert all(kept[k] == original[k] for k in must_stay if k in original)
    assert set(kept) <= set(original)
    # the label and the macro are gone, the thumbnail stays
    assert "label" not in assoc and "macro" not in assoc
    assert assoc == [a for a in original_assoc if a == "thumbnail"]
    # replaced is only DICOM instance UIDs, each a fresh 2.25 UID
    assert set(replaced) == set(record["replaced_uids"])
    for k in replaced:
        assert k.startswith("dicom.") and k.endswith("UID")
        assert re.fullmatch(r"2\.25\.\d+", kept[k]), kept[k]
    # no kept value holds a removed or replaced value (filenames, dates, users, UIDs)
    gone = secrets(removed) | secrets(replaced)
    for k, v in kept.items():
        for s in gone:
            assert s not in v, (k, s)
    # nor does any byte of the container, nor the source's file name
    blob = box.read_bytes()
    for s in gone | {src.stem}:
        assert s.encode() not in blob, s
    # the record: names only, what was removed
    assert sorted(record["removed_properties"]) == sorted(removed)
    assert set(record["removed_associated_images"]) == set(original_assoc) - {"thumbnail"}
    assert not secrets({k: v for k, v in original.items()}) & set(json.dumps(record).split('"'))
    code, out, _ = run(capsys, "info", box)
    assert code == 0
    line = next(x for x in out.splitlines() if "de-identified:" in x)
    assert f"removed {len(removed)} propert" in line
    assert all((k if k.isprintable() else k.encode("unicode_escape").decode()) in line
               for k in removed)
    if "label" in original_assoc:
        assert "the label, macro images" in line
    assert "the source file name" in line and "name left out" in out
    code, out, _ = run(capsys, "info", box, "--json")
    assert json.loads(out)["deidentified"] == record


def test_without_deidentify_nothing_changes(tmp_path: Path, capsys) -> None:
    src = need(REAL_SLIDES["generic-tiff"])
    box = tmp_path / "p.zarr"
    code, _, err = run(capsys, "compress", src, box, *FAST)
    assert code == 0, err
    with open_container(box) as c:
        assert c.metadata.deidentified is None and c.metadata.source_name == src.name
        assert "openslide.quickhash-1" in c.metadata.properties
    code, out, _ = run(capsys, "info", box, "--json")
    assert "deidentified" not in json.loads(out)
    code, out, _ = run(capsys, "info", box)
    assert "de-identified" not in out


def test_decompress_deidentify_leaves_the_source_name_out(tmp_path: Path, capsys) -> None:
    import tifffile

    src = need(REAL_SLIDES["svs-jpeg"])
    box = tmp_path / "c.zarr.zip"
    code, _, err = run(capsys, "compress", src, box, "--tile-size", "512", *FAST)
    assert code == 0, err

    def description(*flags: str) -> str:
        out = tmp_path / "x.tiff"
        code, _, err = run(capsys, "decompress", box, out, "--overwrite", "--quiet", *flags)
        assert code == 0, err
        with tifffile.TiffFile(out) as t:
            return t.pages[0].description

    assert src.name in description()
    assert src.stem not in description("--deidentify")
    assert "wsicodec pyramid from a container (jpegxl)" == description("--deidentify")


def test_dicom_rules_on_a_fuller_header() -> None:
    """Patient, accession, people, dates, specimen and container ids go; instance UIDs get
    new values, the same new value wherever the same old one appeared; class UIDs stay."""
    study = "1.2.826.0.1.3680043.8.498.1"
    props = {
        "openslide.vendor": "dicom",
        "dicom.PatientName": "DOE^JANE", "dicom.PatientID": "MRN0012345",
        "dicom.PatientBirthDate": "19500101", "dicom.AccessionNumber": "S22-01234",
        "dicom.ReferringPhysicianName": "HOUSE^GREGORY", "dicom.StudyDate": "20220301",
        "dicom.AcquisitionDateTime": "20220301101010", "dicom.InstitutionName": "General",
        "dicom.DeviceSerialNumber": "SN-998877", "dicom.ContainerIdentifier": "S22-01234-A1",
        "dicom.OtherPatientIDsSequence[0].PatientID": "OLD-77",
        "dicom.SpecimenDescriptionSequence[0].SpecimenIdentifier": "S22-01234-A1-1",
        "dicom.SpecimenDescriptionSequence[0].SpecimenUID": "1.2.3.4.5.6.7",
        "dicom.StudyInstanceUID": study,
        "dicom.ReferencedStudySequence[0].ReferencedSOPInstanceUID": study,
        "dicom.SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.6",
        "dicom.ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.6",
        "dicom.Manufacturer": "Acme", "dicom.ManufacturerModelName": "Scan 9000",
        "dicom.ImageType[0]": "ORIGINAL",
        "dicom.OpticalPathSequence[0].IlluminationWaveLength": "550",
        "dicom.ImageComments": "slide of DOE^JANE",
    }
    d = deidentify(props, "dicom", ["label", "macro", "thumbnail", "overview"])
    for k in ("dicom.PatientName", "dicom.PatientID", "dicom.PatientBirthDate",
              "dicom.AccessionNumber", "dicom.ReferringPhysicianName", "dicom.StudyDate",
              "dicom.AcquisitionDateTime", "dicom.InstitutionName", "dicom.DeviceSerialNumber",
              "dicom.ContainerIdentifier", "dicom.OtherPatientIDsSequence[0].PatientID",
              "dicom.SpecimenDescriptionSequence[0].SpecimenIdentifier", "dicom.ImageComments"):
        assert k in d.removed_properties and k not in d.properties, k
    for k in ("dicom.SOPClassUID", "dicom.ReferencedSOPClassUID", "dicom.Manufacturer",
              "dicom.ManufacturerModelName", "dicom.ImageType[0]",
              "dicom.OpticalPathSequence[0].IlluminationWaveLength"):
        assert d.properties[k] == props[k], k
    new = d.properties["dicom.StudyInstanceUID"]
    assert new.startswith("2.25.") and new != study
    assert d.properties["dicom.ReferencedStudySequence[0].ReferencedSOPInstanceUID"] == new
    assert d.properties["dicom.SpecimenDescriptionSequence[0].SpecimenUID"] not in (new, "1.2.3.4.5.6.7")
    assert d.removed_associated_images == ("label", "macro", "overview")
    again = deidentify(props, "dicom").properties["dicom.StudyInstanceUID"]
    assert again != new                      # fresh for every copy: copies cannot be linked
    assert "MRN0012345" not in json.dumps(d.record()) and "DOE" not in json.dumps(d.record())


def test_name_patterns_catch_other_vendors_and_the_safety_net_catches_echoes() -> None:
    props = {"openslide.vendor": "mirax", "openslide.mpp-x": "0.25",
             "mirax.GENERAL.SLIDE_NAME": "case 4711", "mirax.GENERAL.SLIDE_ID": "abc",
             "mirax.GENERAL.SLIDE_CREATIONDATETIME": "2020-01-01",
             "mirax.GENERAL.OBJECTIVE_MAGNIFICATION": "20",
             "mirax.NONHIERLAYER_0_SECTION.SCANNER_HARDWARE_ID": "X1",
             "leica.barcode": "B123", "philips.DICOM_PATIENT_NAME": "x",
             "vendorx.freeform": "scanned as case 4711 by smith"}
    kept, removed = deidentify_properties(props, "mirax")
    assert set(kept) == {"openslide.vendor", "openslide.mpp-x",
                         "mirax.GENERAL.OBJECTIVE_MAGNIFICATION"}
    assert "vendorx.freeform" in removed            # echoes the removed slide name
    assert removal_reason("vendorx.freeform", "mirax") is None   # only the net caught it
    assert removal_reason("aperio.Filename", "aperio")
    assert removal_reason("openslide.mpp-x", "aperio") is None


def test_associated_none_help_points_to_deidentify() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compress"]
    helps = {a.dest: a.help for a in sub._actions}
    assert "properties" in helps["associated"] and "--deidentify" in helps["associated"]
    assert "label" in helps["deidentify"] and "macro" in helps["deidentify"]
