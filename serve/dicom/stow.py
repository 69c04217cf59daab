"""STOW-RS in (DICOM PS3.18 10.5): each part of a request is one instance given to the DICOM node's own
receive(), so a part gets exactly what a C-STORE of it would (checks, results.jsonl events, SR and outbox);
the answer maps the DIMSE outcome onto the STOW-RS response.

What C-STORE refuses in association negotiation (a SOP class that is not a chest radiograph, a transfer
syntax this node cannot decode, Deflated), STOW-RS refuses per part, with the PS3.18 failure reason. A part
that fails never stops the others."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from xray.common.dicom_decode import read_dicom_header
from xray.common.errors import ImageError, one_line

from .multipart import Part

# PS3.18 Table 10.6.3-3, FailureReason (0008,1197)
PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES = 0x0110, 0x0122, 0xA700
DOES_NOT_MATCH, CANNOT_UNDERSTAND, TRANSFER_SYNTAX_NOT_SUPPORTED = 0xA900, 0xC000, 0xC122
# A part over --max-instance-mb: 0x0110, "did not store the Instance because of a general failure in processing
# the operation". Not A7xx ("out of resources"): this node's answer for "not now" (503 when alone), and STOW-RS
# clients, ours included (stow_client.decide), send A7xx again, while the part will never fit the limit. Not
# Cxxx ("cannot understand certain Data Elements"): the instance may be valid; its elements were never read.
TOO_LARGE = PROCESSING_FAILURE
RETRY_AFTER_S = 5


@dataclass
class Outcome:
    sop_class: str | None
    sop_instance: str | None
    failure: int | None = None  # None: stored (the node answered 0x0000)
    reason: str = ""


def store_parts(node, parts: list[Part], study: str | None, client: str) -> list[Outcome]:
    """Each part through the node, in order (one at a time, like one association)."""
    return [store_part(node, part, study, client) for part in parts]


def store_part(node, part: Part, study: str | None, client: str) -> Outcome:
    start = time.perf_counter()
    ids = {"received_by": "STOW-RS", "client": client, "sop_instance_uid": ""}
    if part.content_type != "application/dicom":
        return _refuse(node, Outcome(None, None, CANNOT_UNDERSTAND, f"a part of type {part.content_type}: "
                                                                    "only application/dicom is taken"), ids)
    if part.data is None:  # over the limit: not copied out of the body, so not read either (no UIDs)
        limit = node.settings.max_instance_mb
        return _refuse(node, Outcome(None, None, TOO_LARGE, f"instance of {part.size / 2**20:.1f} MB, larger than "
                                                             f"the {limit:g} MB limit (--max-instance-mb)"), ids)
    try:
        header, deflated = read_dicom_header(io.BytesIO(part.data), "part")
    except ImageError as e:
        return _refuse(node, Outcome(None, None, CANNOT_UNDERSTAND, f"cannot read the dataset ({e})"), ids)
    meta = header.file_meta
    sop_class = str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "") or None
    sop_instance = str(header.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "") or None
    outcome = Outcome(sop_class, sop_instance)
    ids.update(sop_class=UID(sop_class).name if sop_class else None, sop_instance_uid=sop_instance or "",
               study_instance_uid=str(header.get("StudyInstanceUID", "")))
    syntax = meta.get("TransferSyntaxUID")
    if sop_class not in node.storage_classes:
        outcome.failure, outcome.reason = SOP_CLASS_NOT_SUPPORTED, \
            "not a chest radiograph storage class (CR, DX, Secondary Capture)"
    elif deflated is not None or syntax not in node.transfer_syntaxes:
        outcome.failure, outcome.reason = TRANSFER_SYNTAX_NOT_SUPPORTED, \
            f"transfer syntax {UID(syntax).name if syntax else 'missing'} is not one this node decodes"
    elif study is not None and str(header.get("StudyInstanceUID", "")) != study:
        outcome.failure, outcome.reason = DOES_NOT_MATCH, f"not of study {study} (the request's URL)"
    if outcome.failure is not None:
        return _refuse(node, outcome, ids)
    try:
        ds = dcmread(io.BytesIO(part.data), defer_size=4096)  # the pixel data stays in part.data
    except Exception as e:
        return _refuse(node, Outcome(sop_class, sop_instance, CANNOT_UNDERSTAND,
                                     f"cannot read the dataset ({one_line(e)})"), ids)
    status = node.receive(ds, lambda: part.data, ids, start)
    if status == 0x0000:
        return outcome
    outcome.failure = OUT_OF_RESOURCES if status >> 8 == 0xA7 else status
    outcome.reason = "the node cannot take it now: send it again later" if outcome.failure == OUT_OF_RESOURCES \
        else f"DIMSE status 0x{status:04X}"
    return outcome


def _refuse(node, outcome: Outcome, ids: dict) -> Outcome:
    node.results.write("instance", status="refused" if outcome.failure != CANNOT_UNDERSTAND else "error",
                       reason=f"{outcome.reason}: STOW-RS failure reason 0x{outcome.failure:04X}", **ids)
    return outcome


def response(outcomes: list[Outcome]) -> tuple[int, dict]:
    """(HTTP status, the PS3.18 response as application/dicom+json). 200: all stored; 202: some; 409: none;
    503 when every part failed only because the node could not take it now (the client sends again)."""
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = [_item(o) for o in stored]
    if failed:
        ds.FailedSOPSequence = [_item(o) for o in failed]
    if not failed:
        status = 200
    elif stored:
        status = 202
    else:
        status = 503 if all(o.failure == OUT_OF_RESOURCES for o in failed) else 409
    return status, ds.to_json_dict()


def _item(o: Outcome) -> Dataset:
    item = Dataset()
    if o.sop_class:
        item.ReferencedSOPClassUID = o.sop_class
    if o.sop_instance:
        item.ReferencedSOPInstanceUID = o.sop_instance
    if o.failure is not None:
        item.FailureReason = o.failure
    return item
