"""/openapi.json says what this server, with this model, accepts: `heatmap_class` is one of the model's
classes, and a model without heatmaps does not offer `heatmap` / `heatmap_class` at all (the server answers
them with 400). Built once, on the first request for the schema."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

HEATMAP_PARAMS = ("heatmap", "heatmap_class")


def model_openapi(app: FastAPI, classes: list[str], has_cam: bool):
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            params = schema["paths"]["/v1/predict"]["post"]["parameters"]
            if not has_cam:
                params[:] = [p for p in params if p["name"] not in HEATMAP_PARAMS]
            for p in params:
                if p["name"] == "heatmap_class":
                    p["schema"] = {"anyOf": [{"type": "string", "enum": list(classes)}, {"type": "null"}],
                                   "title": "Heatmap Class"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
