"""The app factory: FastAPI app + middleware + routes; the model's warm-up and the drain in the lifespan."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from xray.infer.model import EdgeModel

from .metrics import Metrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .routes import STATIC, router
from .service import NOTICE, Service
from .settings import Settings

log = logging.getLogger("xray.serve")


def create_app(model: EdgeModel, settings: Settings, node_settings=None) -> FastAPI:
    """node_settings (serve.dicom.node.NodeSettings): also a DICOM node on the same model worker; the
    caller starts it (app.state.node.start(), so a port in use fails before HTTP starts) and the
    lifespan stops it before the model worker."""
    metrics = Metrics()
    service = Service(model, settings, metrics)
    node = None
    if node_settings is not None:
        from .dicom.node import DicomNode

        node = DicomNode(service, node_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.create_task(asyncio.to_thread(service.warm_up))  # live at once, ready after the warm-up
        try:
            yield
        finally:
            if not warm.done():
                await warm
            if node is not None:
                await asyncio.to_thread(node.stop)  # its associations finish on the model worker first
            await asyncio.to_thread(service.close)  # uvicorn has finished the in-flight requests by now
            log.info("stopped")

    app = FastAPI(title="xray-edge", version="0.1.0", lifespan=lifespan,
                  description=f"Chest X-ray classification with {model.info.model_name} "
                              f"({model.info.precision}). {NOTICE}")
    app.state.service, app.state.node = service, node
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    if settings.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "x-api-key", "authorization", "x-filename"])
    # added last = outermost: metrics see every response, the key is checked before the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
