"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Internal bugs are *not* XrayError and keep their traceback; that is how the two are told apart.
"""
from __future__ import annotations

import functools
import sys

EXIT_OK = 0
EXIT_FAILURE = 1  # the work ran but some inputs failed (e.g. xray-infer on a folder with bad files)
EXIT_USAGE = 2  # bad input: missing path, wrong model, inconsistent data; nothing useful was done


class XrayError(Exception):
    """An error the user can fix; the message is the whole story."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ImageError(XrayError):
    """An image that cannot be used: unreadable, corrupt, not an image, too large.

    `kind` is stable: xray-serve's error objects and its Prometheus labels carry it, so clients can act
    on it without parsing the message. A plain ImageError (e.g. a file that cannot be read) is "not_an_image".
    """

    kind = "not_an_image"


class EmptyImage(ImageError):
    """A file or upload of 0 bytes."""

    kind = "empty"


class TooManyPixels(ImageError):
    """Refused from the header before decoding: more pixels or decoded bytes than the limits allow."""

    kind = "too_many_pixels"


class CorruptImage(ImageError):
    """A known image format whose data is truncated or damaged, or that the decoder chokes on."""

    kind = "corrupt"


class BadDicom(ImageError):
    """A DICOM file whose header, pixel data or display transforms cannot be used."""

    kind = "bad_dicom"


class NotAnImage(ImageError):
    """Bytes no decoder recognises as an image."""

    kind = "not_an_image"


def one_line(e: BaseException, limit: int = 200) -> str:
    """A library's exception as one short line (pydicom's and PIL's messages may span lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exit_on_user_error(func):
    """Wrap a CLI entry point: XrayError -> 'error: <message>' on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except XrayError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
