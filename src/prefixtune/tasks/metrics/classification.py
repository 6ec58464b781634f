"""Classification metrics of class ids: accuracy, macro F1, Matthews correlation."""

from __future__ import annotations

import math
from collections.abc import Sequence


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, macro F1, and Matthews correlation (multi-class form) of class ids."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = sorted(set(labels) | set(predictions))
    k = {c: i for i, c in enumerate(classes)}
    conf = [[0] * len(classes) for _ in classes]
    for p, y in zip(predictions, labels, strict=True):
        conf[k[y]][k[p]] += 1
    n = len(labels)
    correct = sum(conf[i][i] for i in range(len(classes)))
    f1s = []
    for i in range(len(classes)):
        tp = conf[i][i]
        pred_i = sum(conf[r][i] for r in range(len(classes)))
        true_i = sum(conf[i])
        f1s.append(2 * tp / (pred_i + true_i) if pred_i + true_i else 0.0)
    t = [sum(row) for row in conf]
    p = [sum(conf[r][c] for r in range(len(classes))) for c in range(len(classes))]
    cov = correct * n - sum(ti * pi for ti, pi in zip(t, p, strict=True))
    denom = math.sqrt(n * n - sum(pi * pi for pi in p)) * math.sqrt(n * n - sum(ti * ti for ti in t))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "mcc": cov / denom if denom else 0.0}
