"""TLS contexts for every port of xray-serve (HTTPS, DICOM in, DICOM and STOW-RS out), from PEM files.

All from the standard library's `ssl`: TLS 1.2 or newer, and for TLS 1.2 only the forward-secret AEAD suites
of BCP 195 (RFC 9325), the profile DICOM PS3.15 B.9/B.10 names (DCMTK's `+py`, Orthanc's defaults speak it).
A server context holds its certificate and key; `reload()` reads the files again into the same context, so
the next handshake uses them and the connections open stay as they are (SIGHUP after a renewal).
"""
from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from xray.common.errors import XrayError

TIMED_OUT = "the handshake timed out"
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"  # TLS 1.2; TLS 1.3's suites all qualify


def check_key_file(path: Path, option: str):
    """A private key others can read is refused (the key is the node's identity). Group bits are allowed:
    Debian's ssl-cert group (0640 root:ssl-cert) is the usual way to share a key with a service user."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise XrayError(f"{option} {path}: {e.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise XrayError(f"{option} {path}: the private key is readable by other users (mode "
                        f"{stat.S_IMODE(mode):04o}): chmod 600 {path} (or 640 with the service's group)")


def _base(purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


@dataclass
class ServerTls:
    """A listening port's TLS: its certificate and key, and the CA its clients' certificates must chain to
    (None: no client certificate asked for). client_optional: a client may come without one (HTTPS, where
    the app decides per path); one it presents is verified all the same."""

    cert: Path
    key: Path
    ca: Path | None = None
    client_optional: bool = False
    option: str = "--tls"  # the options' prefix, for error lines

    def __post_init__(self):
        self.context = _base(ssl.Purpose.CLIENT_AUTH)
        if self.ca is not None:
            self.context.verify_mode = ssl.CERT_OPTIONAL if self.client_optional else ssl.CERT_REQUIRED
        self.reload()

    def reload(self):
        """Read the files (again) into the context: the certificate and key are replaced, a CA file's
        certificates are added (removing a CA takes a restart). Raises XrayError with one line when a file is
        unusable, and the context keeps what it had (a renewal half-copied must not take the port down)."""
        check_key_file(self.key, f"{self.option}-key")
        fresh = _base(ssl.Purpose.CLIENT_AUTH)
        _load(fresh, self.cert, self.key, self.ca, self.option)  # all checked before the live context changes
        _load(self.context, self.cert, self.key, self.ca, self.option)


def _load(ctx: ssl.SSLContext, cert: Path, key: Path | None, ca: Path | None, option: str):
    try:
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise XrayError(f"{option}-cert {cert} / {option}-key {key}: {_why(e)}") from None
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise XrayError(f"{option}-ca {ca}: {_why(e)}") from None


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                   option: str = "--send-tls") -> ssl.SSLContext:
    """For connecting out: the peer verified (host name or IP against its certificate) against `ca`, else the
    system's store; with cert/key, our own identity for a peer that asks for one."""
    if key is not None:
        check_key_file(key, f"{option}-key")
    ctx = _base(ssl.Purpose.SERVER_AUTH)  # CERT_REQUIRED and check_hostname: never a silent fall back
    _load(ctx, cert, key, ca, option)
    return ctx


def subject(peercert: dict | None) -> str | None:
    """An RFC 4514-like one-line subject ('CN=MODALITY,O=Hospital') of a verified peer certificate."""
    if not peercert or "subject" not in peercert:
        return None
    names = [f"{_SHORT.get(k, k)}={v}" for rdn in reversed(peercert["subject"]) for k, v in rdn]
    return ",".join(names) or None


def common_name(peercert: dict | None) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def handshake_reason(e: BaseException) -> str:
    """One line saying why a handshake failed, in the words a reader of the log needs."""
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return TIMED_OUT
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate refused: {e.verify_message}"
    reason = getattr(e, "reason", None)
    if reason:
        hints = {"PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
                 "WRONG_VERSION_NUMBER": "not TLS (plain TCP?) or a protocol version below TLS 1.2",
                 "UNSUPPORTED_PROTOCOL": "protocol version below TLS 1.2",
                 "NO_SHARED_CIPHER": "no cipher suite in common (BCP 195 only)",
                 "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this node's certificate",
                 "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused this node's certificate",
                 "CERTIFICATE_VERIFY_FAILED": "certificate refused"}
        return f"{hints.get(reason, reason.lower().replace('_', ' '))} ({reason})"
    if isinstance(e, ConnectionError | EOFError) or "EOF" in str(e):
        return "the peer closed the connection during the handshake"
    return _why(e)


def _why(e: BaseException) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e or type(e).__name__).split())


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress", "domainComponent": "DC"}
