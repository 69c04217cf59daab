"""The HTTP API. Handlers stay thin: parse the request, hand the work to the Service, shape the answer."""
from __future__ import annotations

from importlib.resources import files as package_files
from pathlib import Path

import fastapi_offline

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .schemas import Detail, Health, Metadata, PredictResponse, Ready
from .service import Service, Unavailable
from .views import Views

STATIC = package_files("xray.serve") / "static"
SWAGGER_UI = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI 5 (OpenAPI 3.1), from PyPI
# a raw body's Content-Type -> the file name extension decoding sees (DICOM is also told by its magic)
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/tiff": ".tif",
              "image/bmp": ".bmp", "image/webp": ".webp", "application/dicom": ".dcm"}
PREDICT_BODY = {
    "description": "One or several images as multipart files (any field name, e.g. `-F file=@a.png -F file=@b.dcm`), "
                   "or one image as the raw body with its Content-Type (image/png, image/jpeg, image/tiff, "
                   "image/bmp, image/webp, application/dicom, application/octet-stream); `X-Filename` names it.",
    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}},
        "required": ["file"]}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}}},
}

router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


@router.get("/health/live", response_model=Health, tags=["health"])
def live():
    """The process is up (restart it if this fails)."""
    return {"status": "live"}


@router.get("/health/ready", response_model=Ready, response_model_exclude_none=True, tags=["health"],
            responses={503: {"description": "loading the model, or shutting down"}})
def ready(request: Request):
    """Ready for traffic: the model is loaded and one warm-up inference ran; 503 while loading or draining.
    With the DICOM node's --send-to, `outbox` says how many reports wait for the PACS and for how long."""
    s, node = service(request), request.app.state.node
    extra = {"outbox": node.outbox_status()} if node is not None and node.outbox is not None else {}
    if s.ready and not s.draining:
        return {"status": "ready", **extra}
    return JSONResponse({"status": "draining" if s.draining else "loading", **extra}, status_code=503)


@router.get("/v1/metadata", response_model=Metadata, tags=["model"])
def metadata(request: Request):
    """What the model says about itself: classes, image spec, precision, checkpoint, export verification."""
    return service(request).metadata()


@router.post("/v1/predict", response_model=PredictResponse, tags=["model"], openapi_extra={"requestBody": PREDICT_BODY},
             responses={400: {"model": Detail, "description": "heatmap for a model without heatmaps, or an invalid "
                                                            "header"},
                        408: {"model": Detail, "description": "the body stalled for --read-timeout-s"},
                        413: {"model": Detail, "description": "body over --max-upload-mb, or more than --max-files "
                                                            "files"},
                        422: {"description": "no image could be decoded (each error has a one-line reason), no "
                                             "file, or an invalid query", "content": {"application/json": {"schema": {
                                                 "anyOf": [{"$ref": "#/components/schemas/PredictResponse"},
                                                           {"$ref": "#/components/schemas/Detail"}]}}}},
                        503: {"model": Detail, "description": "queue full, loading or shutting down (see "
                                                            "Retry-After)"}})
async def predict(request: Request, top_k: int | None = Query(None, ge=1, description="Also list the k most "
                  "probable classes"), ood_action: str | None = Query(None, pattern="^(flag|abstain)$",
                  description="Images the guard flags: flag (default) or abstain (prediction OUT_OF_DISTRIBUTION)"),
                  preview: bool = Query(False, description="Add each image as decoded (DICOM rescale / VOI / "
                                        "inversion applied, longest side <= 1024) as a data:image/jpeg URL"),
                  heatmap: bool = Query(False, description="Add the class activation map as a transparent "
                                        "data:image/png layer of the preview's size (models with heatmaps)"),
                  heatmap_class: str | None = Query(None, description="The class the heatmap shows (default: "
                                                    "the predicted one; an abstained image gets none without it)")):
    """Classify one or more chest X-ray images (every format xray-infer reads, DICOM included)."""
    s = service(request)
    views = requested_views(s, preview, heatmap, heatmap_class)
    try:
        with s.admit():
            files = await read_uploads(request, s.settings.max_files)
            request.state.images = len(files)  # for the audit trail (serve.audit_http)
            records = await s.classify(files, min(top_k, len(s.model.info.classes)) if top_k else None,
                                       ood_action or s.settings.ood_action, views)
    except Unavailable as e:
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})
    except MemoryError:  # the machine's state, not the images': the client sends them again later
        s.metrics.errors.labels("out_of_memory").inc()
        return JSONResponse({"detail": "out of memory: send the images again later"}, status_code=503,
                            headers={"Retry-After": "5"})
    except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing held
        s.metrics.errors.labels("client_disconnected").inc()
        return Response(status_code=400)
    body = {"model": {"name": s.model.info.model_name, "precision": s.model.info.precision,
                      "checkpoint_sha256": s.model.info.checkpoint_sha256}, "predictions": records}
    failed = [r for r in records if "error" in r]
    if len(failed) == len(records):
        first = failed[0]["error"]["message"]
        body["detail"] = first if len(records) == 1 else f"none of the {len(records)} images could be used ({first})"
        return JSONResponse(body, status_code=422)
    return JSONResponse(body)


def requested_views(s: Service, preview: bool, heatmap: bool, heatmap_class: str | None) -> Views:
    """The query's views, or 400 before the body is read when the model cannot draw them."""
    classes = list(s.model.info.classes)
    if (heatmap or heatmap_class) and not s.model.has_cam:
        raise HTTPException(400, f"this model ({s.model.path.name}) has no heatmaps: re-export it with a current "
                                 "xray-export, or leave out heatmap")
    if heatmap_class is not None and heatmap_class not in classes:
        raise HTTPException(400, f"heatmap_class {heatmap_class!r} is not one of the model's classes: "
                                 f"{', '.join(classes)}")
    return Views(preview, heatmap or heatmap_class is not None,
                 None if heatmap_class is None else classes.index(heatmap_class))


async def read_uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        data = await request.body()
        if not data:
            raise HTTPException(422, "empty body: send an image as the body (with its Content-Type) or as "
                                     "multipart files")
        name = request.headers.get("x-filename") or "upload" + EXTENSIONS.get(content_type.split(";")[0].strip(), "")
        return [(name, data)]
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except StarletteHTTPException as e:  # what Starlette's form parser raises (FastAPI's is a subclass)
        if e.status_code == 400 and "too many files" in str(e.detail).lower():
            raise HTTPException(413, f"more than {max_files} files in one request (--max-files)") from None
        raise
    try:
        uploads = [(v.filename or key, await v.read()) for key, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()
    if not uploads:
        raise HTTPException(422, "no file in the multipart body: send images as file fields (curl -F file=@image.png)")
    return uploads


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request):
    """Prometheus metrics: requests and errors by kind, latency and batch-size histograms, queue depth, model."""
    return Response(service(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/docs", include_in_schema=False)
def docs():
    """Swagger UI for /openapi.json, every asset from this server (no CDN). The page is static/docs.html, which
    starts Swagger UI from static/docs.js: unlike FastAPI's get_swagger_ui_html it has no inline <script>, so
    /docs runs under the same Content-Security-Policy as the rest (security_headers.py)."""
    return FileResponse(STATIC / "docs.html", media_type="text/html")


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")
