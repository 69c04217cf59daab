"""--send-credentials FILE: the Authorization header of a DICOMweb destination, read from a file so the secret is
in neither the command line (ps shows it) nor the logs. Its first line is `Bearer TOKEN` or `user:password`
(HTTP Basic). The sender reads it again before every request: a cloud token expires within the hour and a cron
job replaces the file, so the next try carries the new one without a restart."""
from __future__ import annotations

import base64
from pathlib import Path


class CredentialsError(Exception):
    """The file cannot give a header now: one line naming the file and why, never its content."""


def authorization_header(path: Path) -> str:
    """The Authorization header's value from the file's first line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CredentialsError(f"--send-credentials {path}: {e.strerror or e}") from None
    try:
        line = raw.decode("utf-8").lstrip("\ufeff").splitlines()[0].strip() if raw.strip() else ""
    except UnicodeDecodeError:
        raise CredentialsError(f"--send-credentials {path}: not UTF-8 text") from None
    if not line:
        raise CredentialsError(f"--send-credentials {path}: the file is empty (expected 'Bearer TOKEN' or "
                               "'user:password' on its first line)")
    scheme, _, token = line.partition(" ")
    if scheme.lower() == "bearer":
        token = token.strip()
        if not token or any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in token):
            raise CredentialsError(f"--send-credentials {path}: 'Bearer' must be followed by one token (printable "
                                   "ASCII, no spaces)")
        return f"Bearer {token}"
    user, colon, password = line.partition(":")
    if colon and user:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    raise CredentialsError(f"--send-credentials {path}: expected 'Bearer TOKEN' or 'user:password' on the first line")
