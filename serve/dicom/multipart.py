"""multipart/related bodies (RFC 2387) as STOW-RS sends them: one DICOM file per part.

The parts are found with bytes.find on the boundary: the body is already in memory (under --max-upload-mb),
and the stdlib email parser would decode megabytes of pixel data as text."""
from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value


class MultipartError(ValueError):
    """The body is not a multipart/related body this endpoint can read (HTTP 400 / 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    content_type: str  # lower case, without parameters
    data: bytes | None  # None: larger than the caller's limit, not copied (size says how large)
    size: int  # bytes of content


def content_type_params(value: str) -> tuple[str, dict]:
    """('multipart/related', {'type': 'application/dicom', 'boundary': ...}) from a Content-Type value
    (RFC 2231 encoded parameters collapsed to text)."""
    m = Message()
    m["content-type"] = value
    return m.get_content_type(), {k.lower(): collapse_rfc2231_value(v) for k, v in (m.get_params() or [])[1:]}


def parse_related(content_type: str, body: bytes | bytearray, part_type: str = "application/dicom",
                  max_part_bytes: int | None = None) -> list[Part]:
    """The parts of a multipart/related body whose root type is part_type (415 for another type). A part of
    more than max_part_bytes comes back without its data: refused on its own, it costs no copy."""
    try:
        kind, params = content_type_params(content_type or "")
    except Exception as e:  # a header the email parser chokes on is the client's error
        raise MultipartError(f"unreadable Content-Type ({' '.join(str(e).split())[:100]})") from None
    if kind != "multipart/related":
        raise MultipartError(f"Content-Type {kind!r}: STOW-RS takes multipart/related; type=\"{part_type}\"", 415)
    if params.get("type", part_type).lower() != part_type:
        raise MultipartError(f"multipart/related of type {params['type']!r}: this node takes {part_type} "
                             "parts only", 415)
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("multipart/related without a boundary parameter")
    delimiter = b"--" + boundary.encode("utf-8", "replace")
    pos = _first_delimiter(body, delimiter)
    if pos < 0:
        raise MultipartError("the body does not contain its boundary")
    parts = []
    pos += len(delimiter)
    while not body.startswith(b"--", pos):  # "--boundary--" closes the body
        line_end = body.find(b"\r\n", pos)
        end = _next_delimiter(body, delimiter, line_end) if line_end >= 0 else -1
        if end < 0:
            raise MultipartError("the body ends before its closing boundary (lines end in CRLF, RFC 2046)")
        parts.append(_part(body, line_end + 2, end, part_type, max_part_bytes))
        pos = end + 2 + len(delimiter)
    if not parts:
        raise MultipartError("the body has no parts")
    return parts


def _first_delimiter(body, delimiter: bytes) -> int:
    """The first delimiter at the start of a line: the same bytes inside the preamble's text do not count."""
    at = body.find(delimiter)
    while at > 0 and body[at - 1:at] != b"\n":
        at = body.find(delimiter, at + 1)
    return at


def _next_delimiter(body, delimiter: bytes, start: int) -> int:
    """Where CRLF--boundary ends the part that begins at start: only when the line ends there (after optional
    spaces) or the body closes with "--" (RFC 2046 5.1.1); the same bytes inside a line are content."""
    needle = b"\r\n" + delimiter
    at = body.find(needle, start)
    while at >= 0:
        after = at + len(needle)
        if body.startswith(b"--", after) or bytes(body[after:after + 64]).lstrip(b" \t").startswith(b"\r\n"):
            return at
        at = body.find(needle, at + 1)
    return -1


def _part(body, start: int, end: int, default_type: str, max_bytes: int | None) -> Part:
    """One part (body[start:end]): its header lines up to the first empty line, then its content, copied once."""
    if body.startswith(b"\r\n", start):  # no headers: the root type
        return _content(body, start + 2, end, default_type, max_bytes)
    head_end = body.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        raise MultipartError("a part without the empty line that ends its headers")
    content_type = default_type
    head = bytes(body[start:head_end]).decode("latin-1")
    for line in re.sub(r"\r\n[ \t]+", " ", head).split("\r\n"):  # folded header lines unfolded
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            content_type = content_type_params(value.strip())[0]
    return _content(body, head_end + 4, end, content_type, max_bytes)


def _content(body, start: int, end: int, content_type: str, max_bytes: int | None) -> Part:
    if max_bytes is not None and end - start > max_bytes:
        return Part(content_type, None, end - start)
    with memoryview(body) as view:  # a bytearray's slice would be a second copy before bytes()
        return Part(content_type, bytes(view[start:end]), end - start)
