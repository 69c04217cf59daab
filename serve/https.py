"""HTTPS for xray-serve: uvicorn with our TLS context, and the client certificate handed to the app.

uvicorn puts nothing about the TLS peer into the ASGI scope. `TlsPeerProtocol` (uvicorn's own HTTP protocol)
adds the ASGI TLS extension (`scope["extensions"]["tls"]["client_cert_name"]`) to every request of a TLS
connection, from the verified certificate of the handshake, so the app can require a client certificate per
path and the audit can name who called. With --tls-client-ca the handshake asks for a certificate and refuses
one the CA did not sign; a client with none still connects, and `ClientCertMiddleware` answers it 403 on every
path but /health/* from this machine (a local probe: `curl --cacert CA https://127.0.0.1:PORT/health/ready`).
"""
from __future__ import annotations

import ssl

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .middleware import send_json
from .tls import ServerTls, subject

LOOPBACK_CLIENTS = ("127.0.0.1", "::1")


def tls_config(tls: ServerTls) -> dict:
    """uvicorn.Config arguments for HTTPS with this context (reloaded in place on SIGHUP)."""
    return {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key),
            "ssl_context_factory": lambda config, default: tls.context, "http": TlsPeerProtocol}


class TlsPeerProtocol(AutoHTTPProtocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTls(self.app, ssl_object)


class _WithTls:
    """The app, with the connection's TLS facts in each request's scope (ASGI TLS extension)."""

    def __init__(self, app, ssl_object: ssl.SSLObject):
        self.app = app
        cert = ssl_object.getpeercert()  # {} or None: no certificate; a verified one otherwise
        self.tls = {"client_cert_name": subject(cert), "client_cert_chain": [], "client_cert_error": None,
                    "tls_version": ssl_object.version()}

    async def __call__(self, scope, receive, send):
        scope.setdefault("extensions", {})["tls"] = self.tls
        return await self.app(scope, receive, send)


def client_subject(scope) -> str | None:
    """The verified client certificate's subject of this request, None without one (or without TLS)."""
    return ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_name")


class ClientCertMiddleware:
    """--tls-client-ca: a request without a verified client certificate is refused (403), except /health/* from
    the loopback address (a probe on the same machine)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or client_subject(scope) is not None or _local_probe(scope):
            return await self.app(scope, receive, send)
        return await send_json(send, 403, "a client certificate signed by --tls-client-ca is required")


def _local_probe(scope) -> bool:
    client = scope.get("client") or ("",)
    return scope["path"].startswith("/health/") and client[0] in LOOPBACK_CLIENTS
