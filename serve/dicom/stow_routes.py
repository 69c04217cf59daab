"""POST /dicomweb/studies[/{study}]: STOW-RS into the DICOM node (xray-serve --dicomweb), for archives that
speak only DICOMweb. Under the API key and the body limit (--max-upload-mb: 413 before or while reading),
like every HTTP route; the parsing and the work run on a thread, like an association's. At most
--max-associations requests are received at once (503 + Retry-After beyond): each holds its body in memory."""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from .multipart import MultipartError, parse_related
from .stow import RETRY_AFTER_S, response, store_parts

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
MEDIA_TYPE = "application/dicom+json"
_BODY = {"required": True, "content": {'multipart/related; type="application/dicom"': {
    "schema": {"type": "string", "format": "binary"}}}}
_STOW_RESPONSE = {"description": "the PS3.18 STOW-RS response (ReferencedSOPSequence / FailedSOPSequence)",
                  "content": {MEDIA_TYPE: {"schema": {"type": "object"}}}}
_RESPONSES = {200: _STOW_RESPONSE, 202: {**_STOW_RESPONSE, "description": "some instances failed"},
              409: {**_STOW_RESPONSE, "description": "no instance was stored"},
              400: {"description": "not a readable multipart/related body"},
              415: {"description": "not multipart/related of application/dicom parts"},
              503: {"description": "the node is loading, draining or saturated: send again after Retry-After"}}


@router.post("/studies", summary="STOW-RS: store instances", openapi_extra={"requestBody": _BODY},
             responses=_RESPONSES, response_class=Response)
async def stow(request: Request) -> Response:
    return await _stow(request, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study",
             openapi_extra={"requestBody": _BODY}, responses=_RESPONSES, response_class=Response)
async def stow_study(request: Request, study: str) -> Response:
    return await _stow(request, study)


async def _stow(request: Request, study: str | None) -> Response:
    node = request.app.state.node
    busy = node.busy() or _bodies_full(node)
    if busy:
        return JSONResponse({"detail": busy}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    node.stow_bodies += 1  # held from here: at most max_associations bodies in memory, as DIMSE associations
    try:
        body = bytearray()
        async for chunk in request.stream():  # one buffer (request.body() would keep a second copy)
            body += chunk
        client = request.client.host if request.client else ""
        try:
            outcomes = await asyncio.to_thread(_parse_and_store, node, request.headers.get("content-type", ""),
                                               body, study, client)
        except MultipartError as e:
            return JSONResponse({"detail": str(e)}, e.status)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it; no traceback for a client that hung up
    finally:
        node.stow_bodies -= 1
    request.state.images = len(outcomes)  # for the audit trail (serve.audit_http)
    status, payload = response(outcomes)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return Response(json.dumps(payload), status, headers=headers, media_type=MEDIA_TYPE)


def _parse_and_store(node, content_type: str, body: bytearray, study: str | None, client: str) -> list:
    """On a worker thread: finding and copying the parts of a 64 MB body takes ~0.1 s, in which the event loop
    would serve nothing else. Off it, the loop waits at most for one part's copy (that holds the GIL), not for the
    whole body. A part over --max-instance-mb is refused on its own, without copying it."""
    parts = parse_related(content_type, body, max_part_bytes=int(node.settings.max_instance_mb * 2**20))
    body.clear()  # the parts hold the instances: the body's memory goes before they are stored
    return store_parts(node, parts, study, client)


def _bodies_full(node) -> str | None:
    limit = node.settings.max_associations
    return f"busy: {limit} STOW-RS requests being received (--max-associations)" if node.stow_bodies >= limit \
        else None
