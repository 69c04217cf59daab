"""POST /dicomweb/studies[/{study}]: STOW-RS into the DICOM node (xray-serve --dicomweb), for archives that
speak only DICOMweb. Under the API key and the body limit (--max-upload-mb: 413 before or while reading),
like every HTTP route; the work runs on a thread, like an association's."""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

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
    busy = node.busy()
    if busy:
        return JSONResponse({"detail": busy}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    body = await request.body()
    try:
        parts = parse_related(request.headers.get("content-type", ""), body)
    except MultipartError as e:
        return JSONResponse({"detail": str(e)}, e.status)
    client = request.client.host if request.client else ""
    outcomes = await asyncio.to_thread(store_parts, node, parts, study, client)
    status, payload = response(outcomes)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return Response(json.dumps(payload), status, headers=headers, media_type=MEDIA_TYPE)
