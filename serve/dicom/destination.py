"""Where --send-to delivers the reports: a DICOM AE over DIMSE (AE@HOST:PORT) or a DICOMweb archive over
STOW-RS (dicomweb+http[s]://HOST[:PORT]/ROOT). Parsed once at start-up, so a typo is one line, not a week of
reports waiting in the outbox."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DICOMWEB_SCHEMES = {"dicomweb+http": "http", "dicomweb+https": "https"}


@dataclass(frozen=True)
class Destination:
    """A DICOM Storage SCP reached by C-STORE."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """AE@HOST:PORT"""
        ae, at, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if not (at and colon and ae and host and port.isdigit() and 0 < int(port) < 65536 and len(ae) <= 16):
            raise ValueError(f"{text!r}: expected AE_TITLE@HOST:PORT (AE title of at most 16 characters) or "
                             "dicomweb+https://HOST[:PORT]/DICOMWEB_ROOT")
        return cls(ae, host, int(port))

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb archive's root (the URL its /studies hangs off); `url` is what --send-to said, without
    credentials (those live in --send-credentials FILE, never in the URL, the logs or /health/ready)."""

    url: str  # dicomweb+https://host[:port]/root, as given
    scheme: str  # http | https
    host: str
    port: int | None  # None: the scheme's default
    root: str  # the path, without its trailing slash ("" for the server's root)

    @classmethod
    def parse(cls, text: str) -> DicomWebDestination:
        """dicomweb+http://HOST[:PORT]/ROOT or dicomweb+https://..."""
        parts = urlsplit(text)
        scheme = DICOMWEB_SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(f"{text!r}: a DICOMweb destination starts with dicomweb+http:// or dicomweb+https://")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{_without_userinfo(parts)!r}: no credentials in the URL: put them in "
                             "--send-credentials FILE")
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: the DICOMweb root takes no ?query or #fragment")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1 or port == 0 or any(c.isspace() for c in text):
            raise ValueError(f"{text!r}: expected dicomweb+https://HOST[:PORT]/DICOMWEB_ROOT (port 1-65535, no spaces)")
        return cls(text, scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def where(self) -> str:
        return self.url

    @property
    def stow_url(self) -> str:
        """The STOW-RS endpoint: the root + /studies (one slash, whatever the root ends with)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port is None else f"{host}:{self.port}"
        return urlunsplit((self.scheme, netloc, f"{self.root}/studies", "", ""))

    @property
    def on_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")


def parse_destination(text: str) -> Destination | DicomWebDestination:
    """--send-to: a DICOMweb URL when it has a scheme (`...://`), else AE@HOST:PORT. ValueError says why not."""
    text = text.strip()
    if "://" in text:
        return DicomWebDestination.parse(text)
    return Destination.parse(text)


def _without_userinfo(parts) -> str:
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
