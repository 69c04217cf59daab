"""Everything xray-serve can be told, in one place (the CLI fills it, the app reads it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from xray.common.imageio import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Settings:
    max_batch: int = 16  # images per onnxruntime run
    max_delay_ms: float = 0.0  # wait this long for more images; 0: batch only what queued while the model ran
    max_queue: int = 32  # requests admitted at once (decoding, waiting, running); the next gets 503
    max_upload_mb: float = 64.0  # request body limit (413 above)
    read_timeout_s: float = 30.0  # longest wait for the next piece of a request body (408 after)
    max_files: int = 16  # images per multipart request
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit, checked from the header
    decode_workers: int = 2  # threads decoding uploads
    ood_action: str = "flag"  # flag | abstain, as xray-infer --ood-action
    api_key: str | None = None  # every endpoint but /health/* and the page needs it when set
    allow_origins: tuple[str, ...] = field(default_factory=tuple)  # CORS: explicit origins only, never "*"
    model_reason: str | None = None  # why this model file (int8 vs fp32 on this CPU)
    tls: bool = False  # served over HTTPS (--tls-cert): responses carry HSTS
    tls_client_ca: bool = False  # --tls-client-ca: every path but /health/* from loopback needs a client certificate

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def is_loopback(host: str) -> bool:
    """The usual loopback names (127.0.0.1, ::1, localhost): a listener no other machine reaches, so no warning
    about keys or TLS. Another 127/8 address counts as a LAN one (tests use 127.0.0.2 to stand for one)."""
    return host in ("127.0.0.1", "localhost", "::1")
