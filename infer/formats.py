"""Writers for xray-infer's output: a readable table, one JSON document, JSON lines, or CSV.

Every writer streams (start / row / finish) so a large folder prints as it goes, except JSON, which
is one document by definition. Probabilities are printed to 6 decimals (JSON: full float precision).
"""
from __future__ import annotations

import csv
import json

import numpy as np

FORMATS = ("table", "json", "jsonl", "csv")


def ranked(probs: np.ndarray, classes, top_k: int | None):
    order = np.argsort(-probs, kind="stable")[: top_k or len(classes)]
    return [(classes[i], float(probs[i])) for i in order]


def record(result, classes, top_k: int | None) -> dict:
    """The JSON object of one file (also what the other writers print)."""
    if result.probs is None:
        return {"file": result.path, "error": result.error}
    best = int(np.argmax(result.probs))
    rec = {"file": result.path, "prediction": classes[best], "probability": float(result.probs[best]),
           "probabilities": {c: float(p) for c, p in zip(classes, result.probs)}}
    if top_k:
        rec["top_k"] = [{"class": c, "probability": p} for c, p in ranked(result.probs, classes, top_k)]
    return rec


class Writer:
    def __init__(self, out, classes, top_k: int | None, file_width: int = 40):
        self.out, self.classes, self.top_k, self.file_width = out, list(classes), top_k, file_width

    def start(self, model_meta: dict):
        pass

    def row(self, result):
        raise NotImplementedError

    def finish(self, metrics: dict | None, metrics_text: str | None):
        pass


class TableWriter(Writer):
    """Fixed-width columns: file, prediction, probability, then every class (or the top k)."""

    def start(self, model_meta):
        self.w = max(4, min(self.file_width, 80))
        heads = [f"top-{i + 1}" for i in range(self.top_k)] if self.top_k else self.classes
        self.cell = max(12, *(len(h) for h in heads)) if not self.top_k else max(len(c) for c in self.classes) + 7
        self._line(["file", "prediction", "prob"] + heads)

    def _line(self, cells):
        file, pred, prob, *rest = cells
        text = f"{_clip(file, self.w):<{self.w}}  {pred:<{max(10, *(len(c) for c in self.classes))}}  {prob:>6}"
        self.out.write(text + "".join(f"  {c:>{self.cell}}" for c in rest) + "\n")

    def row(self, result):
        if result.probs is None:
            return  # errors go to stderr, one line each
        rec = record(result, self.classes, self.top_k)
        if self.top_k:
            rest = [f"{c} {p:.4f}" for c, p in ranked(result.probs, self.classes, self.top_k)]
        else:
            rest = [f"{p:.4f}" for p in result.probs]
        self._line([rec["file"], rec["prediction"], f"{rec['probability']:.4f}"] + rest)

    def finish(self, metrics, metrics_text):
        if metrics_text:
            self.out.write("\n" + metrics_text)


class JsonWriter(Writer):
    def start(self, model_meta):
        self.doc = {"model": model_meta, "predictions": [], "errors": []}

    def row(self, result):
        rec = record(result, self.classes, self.top_k)
        self.doc["errors" if result.probs is None else "predictions"].append(rec)

    def finish(self, metrics, metrics_text):
        if metrics is not None:
            self.doc["metrics"] = metrics
        json.dump(self.doc, self.out, indent=2)
        self.out.write("\n")


class JsonLinesWriter(Writer):
    def row(self, result):
        self.out.write(json.dumps(record(result, self.classes, self.top_k)) + "\n")


class CsvWriter(Writer):
    """file, prediction, probability, one column per class (or top1_class, top1_probability, ...), error."""

    def start(self, model_meta):
        self.csv = csv.writer(self.out, lineterminator="\n")
        if self.top_k:
            probs = [f"top{i + 1}_{k}" for i in range(self.top_k) for k in ("class", "probability")]
        else:
            probs = [f"p_{c}" for c in self.classes]
        self.csv.writerow(["file", "prediction", "probability", *probs, "error"])

    def row(self, result):
        if result.probs is None:
            self.csv.writerow([result.path, "", "", *[""] * self._n_prob_columns(), result.error])
            return
        rec = record(result, self.classes, self.top_k)
        if self.top_k:
            probs = [v for c, p in ranked(result.probs, self.classes, self.top_k) for v in (c, f"{p:.6f}")]
        else:
            probs = [f"{p:.6f}" for p in result.probs]
        self.csv.writerow([rec["file"], rec["prediction"], f"{rec['probability']:.6f}", *probs, ""])

    def _n_prob_columns(self):
        return 2 * self.top_k if self.top_k else len(self.classes)


WRITERS = {"table": TableWriter, "json": JsonWriter, "jsonl": JsonLinesWriter, "csv": CsvWriter}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
