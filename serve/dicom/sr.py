"""The DICOM objects xray-edge sends back to the PACS for one classified image, built with highdicom.

build_sr: a Comprehensive SR (TID 1500 Measurement Report) in the image's study: the predicted class as a
coded "Finding", every class probability (and the OOD score) as a number, the source image referenced, the
model as the observer device. It is a machine result, so it is flagged UNVERIFIED and PRELIMINARY.
build_heatmap_sc: an RGB Secondary Capture of a heatmap overlay, same study. summarize_sr: reads an SR back
with pydicom only (what the node's tests and the README use). No torch here: edge-side dependencies only.
"""
from __future__ import annotations

import copy
import re
import uuid
import warnings

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

OOD_PREDICTION = "OUT_OF_DISTRIBUTION"
LOCAL_SCHEME = "99XRAYEDGE"  # private coding scheme ("99" prefix: PS3.3 8.2 private schemes)
SERIES_DESCRIPTION = "xray-edge AI result"
HEATMAP_DESCRIPTION = "xray-edge AI heatmap"

# SNOMED CT for the default classes. codes.SCT.Normal (17621005) is in pydicom's bundled dictionary;
# Pneumonia and Tuberculosis are not, so their concept ids (233604007 |Pneumonia (disorder)|,
# 56717001 |Tuberculosis (disorder)|) are spelled out here.
KNOWN_FINDINGS = {
    "NORMAL": hd.sr.CodedConcept.from_code(codes.SCT.Normal),
    "PNEUMONIA": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "TUBERCULOSIS": hd.sr.CodedConcept("56717001", "SCT", "Tuberculosis"),
}
NOT_ASSESSED = hd.sr.CodedConcept("OOD", LOCAL_SCHEME, "Image not suitable for automated assessment")
OOD_SCORE = hd.sr.CodedConcept("OOD_SCORE", LOCAL_SCHEME, "Out-of-distribution score")
OOD_REASON = hd.sr.CodedConcept("OOD_REASON", LOCAL_SCHEME, "Out-of-distribution reason")
INTENDED_USE = hd.sr.CodedConcept("INTENDED_USE", LOCAL_SCHEME, "Intended use")
RESEARCH_USE = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
PROBABILITY_PREFIX = "Probability of "
NO_UNITS = codes.UCUM.NoUnits  # ("1", UCUM, "no units"): a probability is dimensionless
# Type 2 attributes highdicom's SR constructor reads as evidence[0].X (an AttributeError if absent)
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A code in the private scheme; the value is upper-cased and limited to A-Z 0-9 _ (over 16 characters
    highdicom writes it as a Long Code Value)."""
    return hd.sr.CodedConcept(re.sub(r"[^A-Z0-9_]", "_", value.upper()), LOCAL_SCHEME, meaning)


def finding_code(class_name: str) -> hd.sr.CodedConcept:
    """SNOMED CT for a known class name, else a local code whose meaning is the class name itself."""
    return KNOWN_FINDINGS.get(class_name.upper()) or _local(class_name, class_name)


def probability_code(class_name: str) -> hd.sr.CodedConcept:
    return _local(f"P_{class_name}", PROBABILITY_PREFIX + class_name)


def stable_uid(*parts: str) -> str:
    """A UID that is a function of its inputs: 2.25 + a name-based (v5) UUID, as PS3.5 B.2 allows.
    (pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores the entropy and is random.)"""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:xray-edge:' + '/'.join(parts)).int}"


# Modality (Type 1 in the SR's evidence) for a source that lacks it (img2dcm writes none), from its SOP class
MODALITY_OF = {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX",
               "1.2.840.10008.5.1.4.1.1.1.1.1": "DX"}
DEFAULT_MODALITY = "OT"  # Secondary Capture and anything else: "other"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source without its pixel data (nothing large is copied), with every attribute the SR and SC copy
    present: Type 2 patient/study attributes empty when missing, Type 1 ones derived (the SOP class and
    instance from the file meta, Modality from the SOP class, study and series UIDs made from the instance
    UID so a rebuilt report lands in the same place). Building never fails on a dataset that was classified.
    The source is not modified."""
    header = pydicom.Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:  # Pixel Data and friends
            header.add(copy.deepcopy(elem))  # highdicom adds these very elements to the SR: share none
    meta = getattr(source, "file_meta", None) or pydicom.Dataset()
    if not header.get("SOPClassUID"):
        header.SOPClassUID = meta.get("MediaStorageSOPClassUID") or SECONDARY_CAPTURE
    if not header.get("SOPInstanceUID"):
        header.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or generate_uid()
    if not header.get("Modality"):
        header.Modality = MODALITY_OF.get(str(header.SOPClassUID), DEFAULT_MODALITY)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not header.get(keyword):
            setattr(header, keyword, stable_uid(keyword, str(header.SOPInstanceUID)))
    for keyword in _PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _observer(model: dict) -> hd.sr.ObservationContext:
    """The model as the observer device; its UID is derived from the checkpoint so one trained model is one
    device across restarts and nodes (a new checkpoint is a new device)."""
    identity = model.get("checkpoint_sha256") or f"{model.get('name')}:{model.get('version')}"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=stable_uid("device", identity), name="xray-edge",
        manufacturer_name=model.get("manufacturer") or "xray-edge", model_name=model.get("name") or None)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device))


def _algorithm(model: dict) -> hd.sr.AlgorithmIdentification:
    sha = model.get("checkpoint_sha256") or "unknown"
    return hd.sr.AlgorithmIdentification(
        name=f"xray-edge {model.get('name')}",
        version=f"{model.get('version')} ({model.get('precision')}, checkpoint {sha[:12]})")


def _group(header: pydicom.Dataset, result: dict, model: dict) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: one Finding (the class, or "not suitable" for an OOD image: never a diagnosis then),
    the probabilities, the OOD score and, for a flagged image, why it was flagged (a TEXT evaluation)."""
    prediction = result.get("prediction")
    if not prediction:
        raise ValueError("the result has no prediction (an error record gets no SR)")
    finding = NOT_ASSESSED if prediction == OOD_PREDICTION else finding_code(prediction)
    measurements = [hd.sr.Measurement(name=probability_code(c), value=float(p), unit=NO_UNITS)
                    for c, p in result.get("probabilities", {}).items()]
    if result.get("ood_score") is not None:
        measurements.append(hd.sr.Measurement(name=OOD_SCORE, value=float(result["ood_score"]), unit=NO_UNITS))
    # the same image and checkpoint give the same tracking UID: a resent result is recognisably the same finding
    tracking_uid = stable_uid("finding", str(header.SOPInstanceUID), str(model.get("checkpoint_sha256")))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="xray-edge classification"),
        finding_type=finding,  # TID 1501's own (121071, DCM, "Finding") row, read back as group.finding_type
        algorithm_id=_algorithm(model), finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)], measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)])
    # TID 1501 allows TEXT qualitative evaluations; highdicom has no class for them, so add the items
    texts = [(INTENDED_USE, RESEARCH_USE)]
    reason = result.get("reason")
    if reason and (prediction == OOD_PREDICTION or result.get("ood")):
        texts.append((OOD_REASON, str(reason)))
    for name, value in texts:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def build_sr(source: pydicom.Dataset, result: dict, model: dict, *, series_instance_uid: str | None = None,
             sop_instance_uid: str | None = None, series_number: int = 9901,
             instance_number: int = 1) -> pydicom.Dataset:
    """A Comprehensive SR of one result, in the source's study (patient/study attributes copied from it),
    in its own series, referencing the source in the evidence and in the content tree. UIDs not given are
    random (serve.dicom.reports passes ones derived from the source and the model)."""
    header = _header(source)
    report = hd.sr.MeasurementReport(observation_context=_observer(model), procedure_reported=codes.SCT.ChestImaging,
                                     imaging_measurements=[_group(header, result, model)])
    return hd.sr.ComprehensiveSR(
        evidence=[header], content=report[0], series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number, sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number, manufacturer=model.get("manufacturer") or "xray-edge", is_complete=True, is_final=False, is_verified=False,
        institution_name=source.get("InstitutionName") or None, series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model.get("name") or None, software_versions=model.get("version") or None,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="xray-edge local codes", responsible_organization="xray-edge")],
        transfer_syntax_uid=ExplicitVRLittleEndian)


def build_heatmap_sc(source: pydicom.Dataset, rgb: np.ndarray, *, series_instance_uid: str | None = None,
                     sop_instance_uid: str | None = None, series_number: int = 9902,
                     instance_number: int = 1) -> pydicom.Dataset:
    """An RGB Secondary Capture (HxWx3 uint8) in the source's study that names the source as its origin.
    highdicom requires the PATIENT coordinate system with a patient orientation: the source's is used (the
    overlay is drawn on the source as displayed); when the source has none it is left empty (Type 2)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"heatmap must be an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    header = _header(source)
    orientation = [str(v) for v in (header.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(orientation)
    with warnings.catch_warnings():  # the PACS's person names are copied as they are, not judged
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_instance_uid or generate_uid(),
            series_number=series_number, sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=instance_number, manufacturer="xray-edge", patient_orientation=tuple(orientation) if known else ("L", "F"),
            series_description=HEATMAP_DESCRIPTION, transfer_syntax_uid=ExplicitVRLittleEndian)
    if not known:
        sc.PatientOrientation = None
    if "Laterality" not in sc:
        sc.Laterality = None  # Type 2C (paired body parts; dciodvfy asks for it): unknown for a derived overlay
    sc.BurnedInAnnotation = "YES"  # the caption (class, probability, "research use only") is drawn in
    sc.DerivationDescription = "xray-edge model attention heatmap overlaid on the source image"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


# ------------------------------------------------------------------------------------------------ reading


def _items(sequence):
    """Every content item of an SR tree, depth first."""
    for item in sequence or []:
        yield item
        yield from _items(item.get("ContentSequence"))


def _code(seq) -> tuple[str, str, str] | None:
    """(value, scheme, meaning) of the first item of a code sequence."""
    if not seq:
        return None
    c = seq[0]
    value = c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue")
    return str(value), str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeMeaning", ""))


def summarize_sr(ds: pydicom.Dataset) -> dict:
    """What an xray-edge SR says, read with pydicom only: the finding, class probabilities, OOD score and
    reason, the SOP Instance UIDs the content tree references, the observer device and the study."""
    out = {"finding": None, "finding_code": None, "probabilities": {}, "ood_score": None, "reason": None,
           "intended_use": None,
           "references": [], "observer_device": None, "study_uid": str(ds.get("StudyInstanceUID", "")) or None}
    for item in _items(ds.get("ContentSequence")):
        name = _code(item.get("ConceptNameCodeSequence"))
        kind = item.get("ValueType")
        if kind == "CODE" and name and name[:2] == ("121071", "DCM") and out["finding"] is None:
            value = _code(item.ConceptCodeSequence)
            out["finding"], out["finding_code"] = value[2], f"{value[1]}:{value[0]}"
        elif kind == "NUM" and name and name[1] == LOCAL_SCHEME:
            measured = item.MeasuredValueSequence[0]
            number = float(measured.get("FloatingPointValue", measured.NumericValue))
            if name[0] == OOD_SCORE.value:
                out["ood_score"] = number
            elif name[0].startswith("P_") and name[2].startswith(PROBABILITY_PREFIX):
                out["probabilities"][name[2][len(PROBABILITY_PREFIX):]] = number
        elif kind == "TEXT" and name:
            if name[:2] == ("121013", "DCM"):  # Device Observer Name
                out["observer_device"] = str(item.TextValue)
            elif name[:2] == (OOD_REASON.value, LOCAL_SCHEME):
                out["reason"] = str(item.TextValue)
            elif name[:2] == (INTENDED_USE.value, LOCAL_SCHEME):
                out["intended_use"] = str(item.TextValue)
        for ref in item.get("ReferencedSOPSequence") or []:
            uid = str(ref.ReferencedSOPInstanceUID)
            if uid not in out["references"]:
                out["references"].append(uid)
    return out
