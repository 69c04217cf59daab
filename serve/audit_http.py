"""The HTTP side of --audit: one event per /v1/predict and /dicomweb/… request, and one per refused
credential (a wrong or missing API key, a missing client certificate), each written when the response starts,
before the client has its answer. It sees the client address, the client certificate's subject (serve.https)
and the status; never a header's value, so never the key. The routes say how many images a request carried
in `request.state.images`."""
from __future__ import annotations

from .https import client_subject

AUDITED_PREFIXES = ("/v1/predict", "/dicomweb/")


class AuditMiddleware:
    def __init__(self, app, audit, api_key: bool):
        self.app, self.audit, self.api_key = app, audit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def audited_send(message):
            if message["type"] == "http.response.start":
                self._record(scope, message["status"])
            await send(message)

        await self.app(scope, receive, audited_send)

    def _record(self, scope, status: int):
        client = (scope.get("client") or ("",))[0]
        subject = client_subject(scope)
        if status == 401:
            self.audit.auth_failed(client=client, what="api key", reason=f"missing or wrong API key on {scope['path']}",
                                   tls_subject=subject)
        elif status == 403 and subject is None and scope.get("scheme") == "https":
            self.audit.auth_failed(client=client, what="client certificate",
                                   reason=f"no client certificate on {scope['path']}")
        if scope["path"].startswith(AUDITED_PREFIXES):
            auth = "certificate" if subject else "key" if self.api_key and status != 401 else "none"
            self.audit.http_request(client=client, method=scope["method"], path=scope["path"], status=status,
                                    auth=auth, tls_subject=subject, images=(scope.get("state") or {}).get("images"))
