"""/openapi.json says what this server, with this model, accepts: at most --max-files files, `heatmap_class`
one of the model's classes, and a model without heatmaps does not offer `heatmap` / `heatmap_class` at all
(the server answers them with 400). Invalid query values get 422 with a one-line `detail`, as every other
error does. The schema is built once, on the first request for it."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

HEATMAP_PARAMS = ("heatmap", "heatmap_class")


def model_openapi(app: FastAPI, classes: list[str], has_cam: bool, max_files: int):
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            post = schema["paths"]["/v1/predict"]["post"]
            post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"] = max_files
            params = post["parameters"]
            if not has_cam:
                params[:] = [p for p in params if p["name"] not in HEATMAP_PARAMS]
            for p in params:
                if p["name"] == "heatmap_class":
                    p["schema"] = {"anyOf": [{"type": "string", "enum": list(classes)}, {"type": "null"}],
                                   "title": "Heatmap Class"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_exception_handler(RequestValidationError, one_line_validation_error)


async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's list of errors as one line: `query top_k: Input should be greater than or equal to 1`."""
    parts = [f"{' '.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)
