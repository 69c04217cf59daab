"""xray-serve: the verified ONNX model behind HTTP, with a web page; onnxruntime + FastAPI, no torch."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click
import uvicorn

from xray.common.errors import EXIT_FAILURE, EXIT_OK, XrayError, exit_on_user_error
from xray.common.imageio import DEFAULT_MAX_PIXELS

from .dicom.options import dicom_options, node_settings_from

KEY_ENV = "XRAY_API_KEY"
EPILOG = """\b
Model: --model (a file or an export folder), else $XRAY_MODEL, else the newest runs/*/export/ below the
current directory; from a folder with both verified models, the faster one on this CPU (int8 with
VNNI/AMX, else fp32; --precision overrides). An int8 model runs only on the CPU classes its export covers:
from a folder it falls back to fp32, a file or --precision int8 is refused unless --force-int8.
\b
Endpoints: GET / (the page), /health/live, /health/ready, /v1/metadata, /metrics, /docs;
POST /v1/predict (multipart files, or one image as the raw body).
\b
DICOM node (--dicom-port): a Storage SCP for CR, DX and Secondary Capture on the same model; every
instance is logged in --results DIR/results.jsonl; --send-to sends an SR per instance, by C-STORE to
AE@HOST:PORT or by DICOMweb STOW-RS to dicomweb+https://HOST/ROOT (--send-credentials FILE for its token).
\b
SIGTERM / Ctrl-C: stop accepting, finish the requests in flight, exit 0. SIGHUP: reopen --results
DIR/results.jsonl (after logrotate moved it).
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--model", "-m", "model_path", metavar="PATH",
              help="ONNX model from xray-export, or its export folder, or models:/NAME/VERSION (MLflow's registry).")
@click.option("--precision", type=click.Choice(["auto", "int8", "fp32"]), default="auto", show_default=True,
              help="Which model of an export folder: auto picks the faster one on this CPU.")
@click.option("--force-int8", is_flag=True,
              help="Run an int8 model even on a CPU its export does not cover (its answers may differ there).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to serve other machines: set an API key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help=f"Require this key (the file's first line) on every endpoint but /health/* and the page; "
                   f"${KEY_ENV} works too.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most images per onnxruntime run.")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Wait up to this long for more images before a run (0: batch what queued while the model ran).")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Predict requests admitted at once; more get 503 with Retry-After.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
              help="Largest request body (413 above, refused before it is read).")
@click.option("--read-timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="A client that sends no body data for this long mid-upload gets 408 (its slot is freed).")
@click.option("--max-files", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most images in one multipart request.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse larger images from their header (decompression bombs).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime threads (0: all cores).")
@click.option("--decode-workers", type=click.IntRange(min=1), default=None,
              help="Threads decoding uploads (default: one per core).")
@click.option("--ood-action", type=click.Choice(["flag", "abstain"]), default="flag", show_default=True,
              help="Default for images the out-of-distribution guard flags (a request may ask otherwise).")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="Allow cross-origin requests from this origin (repeatable; '*' is refused). Default: none.")
@dicom_options
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@exit_on_user_error
def main(model_path, precision, force_int8, host, port, api_key_file, max_batch, max_delay_ms, max_queue, max_upload_mb,
         read_timeout_s, max_files, max_pixels, threads, decode_workers, ood_action, allow_origins, log_level, **dicom):
    """Serve chest X-ray classification over HTTP: a JSON API, Prometheus metrics and a web page."""
    from xray.infer.model import cpu_count, open_model

    from .app import create_app
    from .settings import Settings

    if "*" in allow_origins:
        raise XrayError("--allow-origin '*' is refused: name the origins that may call the API")
    api_key = read_key(api_key_file)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    model, choice = open_model(model_path, precision, threads, force_int8)
    log = logging.getLogger("xray.serve")
    (log.warning if choice.forced else log.info)("model %s (%s)", model.path, choice.reason or model.info.precision)
    for note in (model.runtime_warning(), model.portability_note(), model.guard_note()):
        if note:
            log.warning(note)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    settings = Settings(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                        max_upload_mb=max_upload_mb, max_files=max_files, max_pixels=max_pixels,
                        decode_workers=decode_workers or cpu_count(), ood_action=ood_action, api_key=api_key,
                        allow_origins=tuple(allow_origins), model_reason=choice.reason, read_timeout_s=read_timeout_s)
    node_settings = node_settings_from(host, **dicom)
    app = create_app(model, settings, node_settings)
    if app.state.node is not None:
        try:
            app.state.node.start()
        except OSError as e:
            raise XrayError(f"DICOM node: could not listen on {host}:{dicom['dicom_port']} ({e.strerror or e})") from None
        reopen_on_sighup(app.state.node.results)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            limit_concurrency=max(256, 4 * max_queue), timeout_graceful_shutdown=30,
                            timeout_keep_alive=5, server_header=False)
    server = GracefulServer(config)
    server.run()
    if not server.started:
        raise XrayError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    sys.exit(EXIT_FAILURE if app.state.failed else EXIT_OK)  # the failure's line is logged already


def reopen_on_sighup(results):
    """SIGHUP (logrotate's postrotate): continue in a new results.jsonl. The reopen takes the log's lock, so it
    runs on a thread of its own, never inside the handler (which may interrupt a write holding that lock)."""
    def handler(signum, frame):
        threading.Thread(target=results.reopen, name="xray-log-reopen", daemon=True).start()

    signal.signal(signal.SIGHUP, handler)


def read_key(path: str | None) -> str | None:
    if path:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise XrayError(f"{path}: the API key file is empty")
        return key
    return os.environ.get(KEY_ENV, "").strip() or None


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, except that a SIGTERM/SIGINT drain ends with exit code 0 (uvicorn re-raises the
    signal after shutting down, which would end the process *by* the signal), and /health/ready turns
    503 as soon as the drain starts."""

    def handle_exit(self, sig, frame):
        self.config.app.state.service.draining = True
        node = self.config.app.state.node
        if node is not None:  # no new associations from now; those open finish in the lifespan's node.stop()
            threading.Thread(target=node.stop_listening, name="xray-node-stop", daemon=True).start()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Also stop when the app gave up (a failed warm-up): better exit non-zero than stay unready forever."""
        if self.config.app.state.failed:
            self.should_exit = True
        return await super().on_tick(counter)


if __name__ == "__main__":
    main()
