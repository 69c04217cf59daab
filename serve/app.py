"""The app factory: FastAPI app + middleware + routes; the model's warm-up and the drain in the lifespan.

A failed warm-up is logged in one line and recorded in `app.state.failed`; the CLI's server then stops and
the process exits non-zero, instead of answering 503 on /health/ready forever."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from xray.infer.model import EdgeModel

from .audit import AuditLog
from .audit_http import AuditMiddleware
from .https import ClientCertMiddleware
from .metrics import Metrics
from .security_headers import SecurityHeadersMiddleware
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .openapi import model_openapi
from .routes import STATIC, SWAGGER_UI, router
from .service import NOTICE, Service
from .settings import Settings

log = logging.getLogger("xray.serve")


def create_app(model: EdgeModel, settings: Settings, node_settings=None, audit: AuditLog | None = None) -> FastAPI:
    """node_settings (serve.dicom.node.NodeSettings): also a DICOM node on the same model worker; the
    caller starts it (app.state.node.start(), so a port in use fails before HTTP starts) and the
    lifespan stops it before the model worker. audit: --audit's trail (None: none)."""
    audit = audit or AuditLog(None)
    metrics = Metrics()
    service = Service(model, settings, metrics)
    node = None
    if node_settings is not None:
        from .dicom.node import DicomNode

        node = DicomNode(service, node_settings, audit)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.create_task(warm_up(service, app))  # live at once, ready after the warm-up
        try:
            yield
        finally:
            warmed = await warm
            if node is not None:
                await asyncio.to_thread(node.stop)  # its associations finish on the model worker first
            if warmed:  # else the model thread never started: nothing to drain
                await asyncio.to_thread(service.close)  # uvicorn has finished the in-flight requests by now
            log.info("stopped")

    # /docs is served from the package (fastapi-offline's Swagger UI files), not a CDN: it works on an offline ward PC
    app = FastAPI(title="xray-edge", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Chest X-ray classification with {model.info.model_name} "
                              f"({model.info.precision}). {NOTICE}")
    model_openapi(app, list(model.info.classes), model.has_cam, settings.max_files)
    app.state.service, app.state.node, app.state.failed = service, node, None
    app.include_router(router)
    if node is not None and node.settings.dicomweb:
        from .dicom.stow_routes import router as stow_router

        app.include_router(stow_router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/docs/static", StaticFiles(directory=str(SWAGGER_UI)), name="docs-static")
    add_middleware(app, settings, metrics, audit)
    return app


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics, audit: AuditLog):
    """Outermost first: metrics (see every response), the security headers, the audit (--audit: it sees every
    answer, refusals included), the client certificate (--tls-client-ca), CORS, the key (checked before the
    body is read), the body's limit and timeout. CORS sits outside the key and body checks so that a preflight
    needs no key and their refusals (401, 413, 408) carry the CORS headers a browser needs to read them; the
    security headers sit outside all of them, so every refusal and the preflights carry them too."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       read_timeout_s=settings.read_timeout_s)
    app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    if settings.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "x-api-key", "authorization", "x-filename"],
                           expose_headers=["retry-after"])
    if settings.tls_client_ca:
        app.add_middleware(ClientCertMiddleware)
    if audit.enabled:
        app.add_middleware(AuditMiddleware, audit=audit, api_key=bool(settings.api_key))
    # the security headers (CSP, nosniff, ...; HSTS over TLS) on every response, the refusals above included
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.tls)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost


async def warm_up(service: Service, app: FastAPI) -> bool:
    """Service.warm_up in a thread; on failure one log line naming the cause (the traceback at debug level)
    and app.state.failed set, for the server to stop on."""
    try:
        await asyncio.to_thread(service.warm_up)
        return True
    except Exception as e:
        app.state.failed = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        log.error("model warm-up failed, stopping: %s", app.state.failed)
        log.debug("warm-up traceback", exc_info=e)
        return False
