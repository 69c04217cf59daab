"""What a transport (DIMSE C-STORE, DICOMweb STOW-RS) tells the Sender about one result, so that the outbox, the
back-off and the results.jsonl events exist once whatever the wire.

A transport has `where` (the destination as logs show it, never a secret) and three calls per round:
`open_round() -> Outcome | None` (None: ready; an Outcome: RETRY, the round ends), `send(entry, objects) ->
[(object, Outcome)]` for each result oldest first with the objects it still has to deliver (an outcome per object
tried, in order; DIMSE stops after a RETRY), and `close()` after the round, whatever happened.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SENT, RETRY, REFUSED = "sent", "retry", "refused"


@dataclass
class Outcome:
    """kind: SENT (the object is stored), RETRY (may pass: the round ends, back-off), REFUSED (permanent: set aside).
    reason: one line for the log and results.jsonl (RETRY, REFUSED). fields: what the results line and a refused
    result's status.json carry besides (status, http_status, warning, already_stored). retry_after_s: the
    destination asked to wait this long (HTTP Retry-After)."""

    kind: str
    reason: str = ""
    fields: dict = field(default_factory=dict)
    retry_after_s: float | None = None

    @classmethod
    def sent(cls, **fields) -> Outcome:
        return cls(SENT, fields=fields)

    @classmethod
    def retry(cls, reason: str, retry_after_s: float | None = None, **fields) -> Outcome:
        return cls(RETRY, reason, fields, retry_after_s)

    @classmethod
    def refused(cls, reason: str, **fields) -> Outcome:
        return cls(REFUSED, reason, fields)
