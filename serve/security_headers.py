"""Pure ASGI middleware: the browser security headers on every HTTP response (the page, its assets, /docs,
the API's answers and the middleware's own refusals, 401 / 413 / 408).

The page and /docs run under a strict Content-Security-Policy: scripts and styles only from files of this
server (no inline <script>, no style attributes in the HTML, no eval), images also from data: and blob: URLs
(the server's previews and heatmaps are data: URLs, the browser's own copy of a picked file a blob: URL),
nothing framed or framing, no <base>, forms posting only here, no plugins. Styles the page's scripts set
through the CSSOM (element.style.opacity = ...) are not inline styles to CSP and need no 'unsafe-inline'.

A header a route set itself is left as it is: a route can give its own response a different policy.
"""
from __future__ import annotations

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
                           "base-uri 'none'; form-action 'self'; object-src 'none'")
HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),  # frame-ancestors 'none' for browsers older than CSP 2
)
# One year, and deliberately without includeSubDomains (or preload): the edge box may be one name among others
# under a shared domain (hospital.example: ward7-xray.hospital.example next to plain-HTTP devices), and HSTS with
# includeSubDomains sent from here would force HTTPS on all of those names in every browser that saw it.
HSTS = ("strict-transport-security", "max-age=31536000")


class SecurityHeadersMiddleware:
    """Adds HEADERS (and HSTS when `hsts`: served over HTTPS) to every http.response.start, unless the
    response already carries that header."""

    def __init__(self, app, hsts: bool = False):
        self.app = app
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (*HEADERS, *([HSTS] if hsts else []))]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {bytes(k).lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
