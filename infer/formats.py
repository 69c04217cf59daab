"""Writers for xray-infer's output: a readable table, one JSON document, JSON lines, or CSV.

Every writer streams (start / row / finish) so a large folder prints as it goes, except JSON, which
is one document by definition. Probabilities are printed to 6 decimals (JSON: full float precision).
"""
from __future__ import annotations

import csv
import json

import numpy as np

FORMATS = ("table", "json", "jsonl", "csv")
OOD_LABEL = "OUT_OF_DISTRIBUTION"


def ood_reason(result, guard: dict) -> str:
    return (f"not like the training data (ood_score {result.ood_score:.3g} > threshold {guard['threshold']:.3g}): "
            "do not trust the prediction; check the image is a frontal chest radiograph")


def ranked(probs: np.ndarray, classes, top_k: int | None):
    order = np.argsort(-probs, kind="stable")[: top_k or len(classes)]
    return [(classes[i], float(probs[i])) for i in order]


def record(result, classes, top_k: int | None, guard: dict | None = None, ood_action: str = "flag") -> dict:
    """The JSON object of one file (also what the other writers print). guard: the model's OOD metadata
    (None: the model has none, no ood fields). ood_action "abstain": a flagged image's prediction is
    OUT_OF_DISTRIBUTION (its probabilities are still listed)."""
    if result.probs is None:
        return {"file": result.path, "error": result.error}
    best = int(np.argmax(result.probs))
    rec = {"file": result.path, "prediction": classes[best], "probability": float(result.probs[best]),
           "probabilities": {c: float(p) for c, p in zip(classes, result.probs)}}
    if top_k:
        rec["top_k"] = [{"class": c, "probability": p} for c, p in ranked(result.probs, classes, top_k)]
    if guard and result.ood is not None:
        rec["ood"], rec["ood_score"] = result.ood, result.ood_score
        if result.ood:
            rec["reason"] = ood_reason(result, guard)
            if ood_action == "abstain":
                rec["prediction"], rec["probability"] = OOD_LABEL, None
    return rec


class Writer:
    def __init__(self, out, classes, top_k: int | None, file_width: int = 40, guard: dict | None = None,
                 ood_action: str = "flag"):
        self.out, self.classes, self.top_k, self.file_width = out, list(classes), top_k, file_width
        self.guard, self.ood_action = guard, ood_action

    def record(self, result) -> dict:
        return record(result, self.classes, self.top_k, self.guard, self.ood_action)

    def start(self, model_meta: dict):
        pass

    def row(self, result):
        raise NotImplementedError

    def finish(self, metrics: dict | None, metrics_text: str | None):
        pass


class TableWriter(Writer):
    """Fixed-width columns: file, prediction, probability, then every class (or the top k), then, for a
    model with the guard, `ood` (OOD on flagged rows) and the score. The header waits for the first row:
    a run where nothing could be classified prints nothing on stdout."""

    def start(self, model_meta):
        self.w = max(4, min(self.file_width, 80))
        heads = [f"top-{i + 1}" for i in range(self.top_k)] if self.top_k else self.classes
        self.heads = heads + (["ood", "ood_score"] if self.guard else [])
        self.cell = max(12, *(len(h) for h in heads)) if not self.top_k else max(len(c) for c in self.classes) + 7
        self.pred_w = max(10, *(len(c) for c in self.classes), len(OOD_LABEL) if self.guard else 0)
        self.started = False

    def _line(self, cells):
        file, pred, prob, *rest = cells
        text = f"{_clip(file, self.w):<{self.w}}  {pred:<{self.pred_w}}  {prob:>6}"
        self.out.write(text + "".join(f"  {c:>{self.cell}}" for c in rest) + "\n")

    def row(self, result):
        if result.probs is None:
            return  # errors go to stderr, one line each
        if not self.started:
            self._line(["file", "prediction", "prob"] + self.heads)
            self.started = True
        rec = self.record(result)
        if self.top_k:
            rest = [f"{c} {p:.4f}" for c, p in ranked(result.probs, self.classes, self.top_k)]
        else:
            rest = [f"{p:.4f}" for p in result.probs]
        if "ood" in rec:
            rest += ["OOD" if rec["ood"] else "-", f"{rec['ood_score']:.4g}"]
        prob = "-" if rec["probability"] is None else f"{rec['probability']:.4f}"
        self._line([rec["file"], rec["prediction"], prob] + rest)

    def finish(self, metrics, metrics_text):
        if metrics_text:
            self.out.write("\n" + metrics_text)


class JsonWriter(Writer):
    def start(self, model_meta):
        self.doc = {"model": model_meta, "predictions": [], "errors": []}

    def row(self, result):
        rec = self.record(result)
        self.doc["errors" if result.probs is None else "predictions"].append(rec)

    def finish(self, metrics, metrics_text):
        if metrics is not None:
            self.doc["metrics"] = metrics
        json.dump(self.doc, self.out, indent=2)
        self.out.write("\n")


class JsonLinesWriter(Writer):
    def row(self, result):
        self.out.write(json.dumps(self.record(result)) + "\n")


class CsvWriter(Writer):
    """file, prediction, probability, one column per class (or top1_class, top1_probability, ...), then for a
    model with the guard ood, ood_score, reason; then error."""

    def start(self, model_meta):
        self.csv = csv.writer(self.out, lineterminator="\n")
        if self.top_k:
            probs = [f"top{i + 1}_{k}" for i in range(self.top_k) for k in ("class", "probability")]
        else:
            probs = [f"p_{c}" for c in self.classes]
        self.guard_columns = ["ood", "ood_score", "reason"] if self.guard else []
        self.csv.writerow(["file", "prediction", "probability", *probs, *self.guard_columns, "error"])

    def row(self, result):
        if result.probs is None:
            blank = [""] * (self._n_prob_columns() + len(self.guard_columns))
            self.csv.writerow([result.path, "", "", *blank, result.error])
            return
        rec = self.record(result)
        if self.top_k:
            probs = [v for c, p in ranked(result.probs, self.classes, self.top_k) for v in (c, f"{p:.6f}")]
        else:
            probs = [f"{p:.6f}" for p in result.probs]
        guard = [str(rec["ood"]).lower(), f"{rec['ood_score']:.6g}", rec.get("reason", "")] if "ood" in rec else (
            [""] * len(self.guard_columns))
        prob = "" if rec["probability"] is None else f"{rec['probability']:.6f}"
        self.csv.writerow([rec["file"], rec["prediction"], prob, *probs, *guard, ""])

    def _n_prob_columns(self):
        return 2 * self.top_k if self.top_k else len(self.classes)


WRITERS = {"table": TableWriter, "json": JsonWriter, "jsonl": JsonLinesWriter, "csv": CsvWriter}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
