"""xray-serve: the verified ONNX model behind HTTP, with a web page; onnxruntime + FastAPI, no torch."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import uvicorn

from xray.common.cli_config import config_option
from xray.common.errors import EXIT_FAILURE, EXIT_OK, XrayError, exit_on_user_error
from xray.common.imageio import DEFAULT_MAX_PIXELS

from .dicom.options import dicom_options, node_settings_from
from .https import tls_config
from .settings import is_loopback
from .tls import ServerTls


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
TLS: --tls-cert/--tls-key serve HTTPS only (HSTS on); --tls-client-ca requires client certificates (but
for /health/* from 127.0.0.1). --dicom-tls-cert/--dicom-tls-key make the DICOM port TLS-only,
--dicom-tls-ca requires client certificates there; --send-tls-ca verifies the PACS. Private keys readable
by other users are refused. --audit FILE: JSON lines of who did what (DICOM audit vocabulary), 0600.

SIGTERM / Ctrl-C: stop accepting, finish the requests in flight, exit 0. SIGHUP: reopen --results
DIR/results.jsonl and --audit FILE (after logrotate moved them) and re-read the TLS certificates and keys.
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@config_option
@click.option("--model", "-m", "model_path", metavar="PATH", type=click.Path(),
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
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Serve HTTPS only (TLS 1.2+), with this PEM certificate (chain); needs --tls-key. Re-read on SIGHUP.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="The PEM private key of --tls-cert (not readable by other users).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Require a client certificate signed by this CA (PEM) on every path but /health/* from 127.0.0.1.")
@click.option("--audit", "audit_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append an audit trail here: JSON lines, 0600, one event per association, instance, report, "
                   "API request and authentication failure (reopened on SIGHUP).")
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
def main(model_path, precision, force_int8, host, port, api_key_file, tls_cert, tls_key, tls_client_ca, audit_path,
         max_batch, max_delay_ms, max_queue, max_upload_mb, read_timeout_s, max_files, max_pixels, threads, decode_workers,
         ood_action, allow_origins, log_level, **dicom):
    """Serve chest X-ray classification over HTTP: a JSON API, Prometheus metrics and a web page."""
    from xray.infer.model import cpu_count, open_model

    from .app import create_app
    from .settings import Settings

    if "*" in allow_origins:
        raise XrayError("--allow-origin '*' is refused: name the origins that may call the API")
    api_key = read_key(api_key_file)
    https = http_tls(tls_cert, tls_key, tls_client_ca)
    node_settings = node_settings_from(host, read_timeout_s=read_timeout_s, **dicom)
    audit = open_audit(audit_path, node_settings.ae_title if node_settings else None)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    model, choice = open_model(model_path, precision, threads, force_int8)
    log = logging.getLogger("xray.serve")
    (log.warning if choice.forced else log.info)("model %s (%s)", model.path, choice.reason or model.info.precision)
    for note in (model.runtime_warning(), model.portability_note(), model.guard_note()):
        if note:
            log.warning(note)
    if not is_loopback(host) and not api_key and not tls_client_ca:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    if not is_loopback(host) and https is None:
        log.warning("serving HTTP on %s without TLS: images and the API key cross the network in clear "
                    "(--tls-cert/--tls-key, or a TLS reverse proxy with --host 127.0.0.1)", host)
    settings = Settings(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                        max_upload_mb=max_upload_mb, max_files=max_files, max_pixels=max_pixels,
                        decode_workers=decode_workers or cpu_count(), ood_action=ood_action, api_key=api_key,
                        allow_origins=tuple(allow_origins), model_reason=choice.reason, read_timeout_s=read_timeout_s,
                        tls=https is not None, tls_client_ca=bool(tls_client_ca))
    app = create_app(model, settings, node_settings, audit)
    node = app.state.node
    if node is not None:
        try:
            node.start()
        except OSError as e:
            raise XrayError(f"DICOM node: could not listen on {node.settings.host}:{dicom['dicom_port']} "
                            f"({e.strerror or e})") from None
    on_sighup(reopen=[audit] + ([node.results] if node else []),
              reload=[t for t in (https, node.settings.tls if node else None) if t is not None])
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            limit_concurrency=max(256, 4 * max_queue), timeout_graceful_shutdown=30,
                            timeout_keep_alive=5, server_header=False, **(tls_config(https) if https else {}))
    audit.started(settings=effective_settings(host, port, https, tls_client_ca, api_key, node, model, settings))
    server = GracefulServer(config)
    try:
        server.run()
    finally:
        audit.stopped(reason="failed" if app.state.failed or not server.started else "shutdown")
        audit.close()
    if not server.started:
        raise XrayError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    sys.exit(EXIT_FAILURE if app.state.failed else EXIT_OK)  # the failure's line is logged already


def http_tls(cert, key, client_ca):
    """--tls-cert/--tls-key/--tls-client-ca: HTTPS's context, its files checked now."""
    if not cert and not key:
        if client_ca:
            raise XrayError("--tls-client-ca needs --tls-cert and --tls-key (HTTPS)")
        return None
    if not (cert and key):
        raise XrayError("--tls-cert and --tls-key go together")
    return ServerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None, client_optional=True, option="--tls")


def open_audit(path, source_id):
    from .audit import AuditLog

    try:
        return AuditLog(Path(path) if path else None, source_id)
    except OSError as e:
        raise XrayError(f"--audit {path}: {e.strerror or e}") from None


def effective_settings(host, port, https, client_ca, api_key, node, model, settings) -> dict:
    """What the start event records: what this node exposes and how it is guarded (no secret, only facts)."""
    out = {"http": f"{'https' if https else 'http'}://{host}:{port}", "http_client_certificates": bool(client_ca),
           "api_key": bool(api_key), "allow_origins": list(settings.allow_origins), "model": str(model.path),
           "precision": model.info.precision}
    if node is not None:
        s = node.settings
        out.update(dicom=f"{s.host}:{s.port}" if s.port is not None else None, dicom_tls=s.tls is not None,
                   dicom_client_certificates=bool(s.tls and s.tls.ca), dicomweb=s.dicomweb, ae_title=s.ae_title,
                   allow_ae=list(s.allow_ae), ae_certificates=dict(s.ae_certificates),
                   send_to=node.sender.where if node.sender else None, send_tls=s.send_tls is not None,
                   log_patient_id=s.log_patient_id)
    return out


def on_sighup(reopen: list, reload: list):
    """SIGHUP (logrotate's postrotate, a certificate renewal): continue in new log files and re-read the TLS
    files. The reopen takes each log's lock, so it runs on a thread of its own, never inside the handler (which
    may interrupt a write holding that lock). A TLS file that cannot be read is one error line; the port keeps
    the certificate it had."""
    log = logging.getLogger("xray.serve")

    def work():
        for target in reopen:
            try:
                target.reopen()
            except (OSError, XrayError) as e:  # the old file stays in use; the certificates are still re-read
                log.error("SIGHUP: could not reopen a log (%s): writing on to the old file", e)
        for tls in reload:
            try:
                tls.reload()
                log.info("SIGHUP: %s-cert %s re-read", tls.option, tls.cert)
            except XrayError as e:
                log.error("SIGHUP: %s (keeping the certificate loaded before)", e)

    def handler(signum, frame):
        threading.Thread(target=work, name="xray-sighup", daemon=True).start()

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
