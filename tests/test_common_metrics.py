"""xray.common.metrics against scikit-learn on seeded random data."""
from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as sk  # a [train] dependency, installed for the tests: missing is a failure, not a skip

from xray.common.metrics import (binary_roc_auc, classification_metrics, confusion_matrix, log_loss,
                                 metrics_markdown, roc_auc_ovr)

CASES = [(seed, c) for seed in (0, 1, 2) for c in (2, 3, 4, 5)]


def _labels(seed, num_classes, n=60):
    """Random true/predicted labels where (for C >= 3) the last class is never predicted and the
    second-to-last class has no support (but is predicted)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, size=n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, num_classes, size=n))
    if num_classes >= 3:
        never_pred, no_support = num_classes - 1, num_classes - 2
        y_pred[y_pred == never_pred] = 0
        y_true[y_true == no_support] = 0
        y_pred[:3] = no_support  # predicted, but never true
    return y_true, y_pred


def _names(c):
    return [f"CLASS_{i}" for i in range(c)]


@pytest.mark.parametrize("seed,num_classes", CASES)
def test_classification_metrics_match_sklearn(seed, num_classes):
    y_true, y_pred = _labels(seed, num_classes)
    labels = list(range(num_classes))
    names = _names(num_classes)
    m = classification_metrics(y_true, y_pred, names)

    if num_classes >= 3:  # the edge cases are really there
        assert (y_pred != num_classes - 1).all()
        assert (y_true != num_classes - 2).all()

    assert m["num_samples"] == len(y_true)
    assert m["classes"] == names
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert m["weighted_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0), abs=1e-12)
    assert m["macro_precision"] == pytest.approx(
        sk.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert m["macro_recall"] == pytest.approx(
        sk.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0), abs=1e-12)

    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, n in enumerate(names):
        pc = m["per_class"][n]
        assert pc["precision"] == pytest.approx(p[i], abs=1e-12)
        assert pc["recall"] == pytest.approx(r[i], abs=1e-12)
        assert pc["f1"] == pytest.approx(f[i], abs=1e-12)
        assert pc["support"] == int(s[i])
        assert isinstance(pc["support"], int)

    assert m["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, num_classes),
                                  sk.confusion_matrix(y_true, y_pred, labels=labels))


def test_unused_class_counts_in_macro_average():
    # class 2 neither true nor predicted: it is still a class of the model, with F1 0
    m = classification_metrics([0, 1, 0, 1], [0, 1, 0, 1], ["A", "B", "C"])
    assert m["accuracy"] == 1.0
    assert m["per_class"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["weighted_f1"] == pytest.approx(1.0)


def test_empty_input():
    m = classification_metrics([], [], ["A", "B"])
    assert m["num_samples"] == 0 and m["accuracy"] == 0.0
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError):
        confusion_matrix([0, 1, 2], [0, 1, 1], 2)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0, -1], 2)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 2)


# ---------------------------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 0])  # 1 and 0 decimals create many / massive ties
def test_binary_roc_auc_matches_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    y = rng.random(80) < 0.3
    y[:2] = [True, False]
    s = rng.random(80) + 0.3 * y
    if decimals is not None:
        s = np.round(s, decimals)
    assert binary_roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_binary_roc_auc_known_values():
    assert binary_roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert binary_roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert binary_roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_binary_roc_auc_none_when_one_class():
    assert binary_roc_auc([1, 1, 1], [0.1, 0.5, 0.9]) is None
    assert binary_roc_auc([0, 0], [0.1, 0.5]) is None
    assert binary_roc_auc([], []) is None


def _probs(rng, n, c, decimals=None):
    p = rng.dirichlet(np.ones(c), size=n)
    if decimals is not None:
        p = np.round(p, decimals)
        p[:, -1] = 1.0 - p[:, :-1].sum(axis=1)
        p = np.clip(p, 0, 1)
        p /= p.sum(axis=1, keepdims=True)
    return p


@pytest.mark.parametrize("seed,num_classes", CASES)
@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_auc_ovr_matches_sklearn(seed, num_classes, decimals):
    rng = np.random.default_rng(seed)
    n = 90
    y = rng.integers(0, num_classes, size=n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    p = _probs(rng, n, num_classes, decimals)
    names = _names(num_classes)
    out = roc_auc_ovr(y, p, names)
    per = []
    for i, name in enumerate(names):
        expected = sk.roc_auc_score(y == i, p[:, i])
        assert out["per_class"][name] == pytest.approx(expected, abs=1e-12)
        per.append(expected)
    assert out["macro"] == pytest.approx(float(np.mean(per)), abs=1e-12)
    if num_classes > 2:
        assert out["macro"] == pytest.approx(
            sk.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(num_classes))),
            abs=1e-12)


def test_roc_auc_ovr_absent_class_is_none_and_excluded_from_macro():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=50)  # class 2 never occurs
    y[:2] = [0, 1]
    p = _probs(rng, 50, 3)
    out = roc_auc_ovr(y, p, ["A", "B", "C"])
    assert out["per_class"]["C"] is None
    a = sk.roc_auc_score(y == 0, p[:, 0])
    b = sk.roc_auc_score(y == 1, p[:, 1])
    assert out["per_class"]["A"] == pytest.approx(a)
    assert out["per_class"]["B"] == pytest.approx(b)
    assert out["macro"] == pytest.approx((a + b) / 2)


def test_roc_auc_ovr_all_undefined():
    out = roc_auc_ovr([0, 0, 0], np.full((3, 2), 0.5), ["A", "B"])
    assert out == {"per_class": {"A": None, "B": None}, "macro": None}


# ---------------------------------------------------------------------------------------- log loss


@pytest.mark.parametrize("seed,num_classes", CASES)
def test_log_loss_matches_sklearn(seed, num_classes):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, num_classes, size=70)
    p = _probs(rng, 70, num_classes)
    expected = sk.log_loss(y, p, labels=list(range(num_classes)))
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-9)


def test_log_loss_perfect_and_zero_probability():
    assert log_loss([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.0, abs=1e-12)
    v = log_loss([0], [[0.0, 1.0]])  # clipped, finite
    assert np.isfinite(v) and v > 20


# ---------------------------------------------------------------------------------------- markdown


def test_metrics_markdown_contains_names_and_counts():
    names = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1, 0]
    y_pred = [0, 1, 0, 1, 1, 2, 0, 2, 2, 2, 0]
    m = classification_metrics(y_true, y_pred, names)
    m["loss"] = 0.1234
    md = metrics_markdown(m, title="Test set")
    assert md.startswith("## Test set\n")
    assert md.endswith("\n")
    for n in names:
        assert n in md
    cm = m["confusion_matrix"]
    assert cm == [[3, 1, 0], [0, 2, 1], [1, 0, 3]]
    for n, row in zip(names, cm):
        assert f"| {n} | " + " | ".join(map(str, row)) + " |" in md
    assert "| true \\ pred | NORMAL | PNEUMONIA | TUBERCULOSIS |" in md
    assert f"| Accuracy | {8 / 11 * 100:.2f}% |" in md
    assert "| Loss (cross-entropy) | 0.1234 |" in md
    assert f"| Images | {len(y_true)} |" in md
    # per-class support column
    assert f"| NORMAL | {m['per_class']['NORMAL']['precision']:.4f} |" in md


def test_metrics_markdown_without_title_or_loss():
    m = classification_metrics([0, 1], [0, 1], ["A", "B"])
    md = metrics_markdown(m)
    assert not md.startswith("##")
    assert "Loss" not in md
    assert "| A | 1 | 0 |" in md and "| B | 0 | 1 |" in md


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    from xray.common.metrics import softmax

    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = softmax(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == pytest.approx(1.0) and np.isfinite(p).all()
    assert softmax(z[1:], 10.0).max() < p[1].max()  # T > 1 lowers confidence, never the ranking
    assert (softmax(z[1:], 10.0).argmax(1) == p[1:].argmax(1)).all()
