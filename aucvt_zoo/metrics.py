"""Evaluation metrics of the LSD challenge and of AU detection, in numpy only.

- Expressions: macro F1 over the 6 classes (the ABAW4 LSD measure, paper Table 1), accuracy, per-class F1 and
  the confusion matrix (rows = true class, columns = predicted class).
- AUs: F1 of each AU over the samples where that AU is labelled (NaN targets are left out), and their mean.

Zero division: a class (or AU) with no true and no predicted samples has precision and recall 0/0; its F1 is
then 0.0, which is scikit-learn's default (`f1_score(..., zero_division='warn')` returns 0.0), and it still
counts in the macro mean over the 6 classes, as `f1_score(y, p, labels=range(6), average='macro')` does. So a
validation set lacking a class cannot reach macro F1 1.0; `per_class_f1` shows which class it was. An AU with
no labelled sample at all has F1 NaN and is left out of `mean_f1` (there is nothing to score).
"""
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ['f1_from_counts', 'confusion_matrix', 'expression_metrics', 'au_metrics']


def f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN) element-wise; 0.0 where the denominator is 0 (no true and no predicted sample)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): entry [t, p] is the number of samples of true class t predicted as p."""
    y_true, y_pred = _as_labels(y_true, 'y_true', num_classes), _as_labels(y_pred, 'y_pred', num_classes)
    if y_true.shape != y_pred.shape:
        raise ValueError(f'y_true has {y_true.shape[0]} samples but y_pred has {y_pred.shape[0]}.')
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def expression_metrics(y_true, y_pred, num_classes: int = 6) -> Dict[str, object]:
    """Macro F1, accuracy, per-class F1 and confusion matrix of expression predictions.

    Args:
        y_true: true class indices (N,); samples with -1 (no expression label) are left out.
        y_pred: predicted class indices (N,), or scores/logits (N, num_classes) of which the argmax is taken.
        num_classes: number of classes; every class counts in the macro mean, present or not.

    Returns:
        dict with `f1` (macro, float), `accuracy` (float), `per_class_f1` (list of floats), `confusion`
        (list of lists of ints, rows = true class) and `num_samples` (samples scored), all JSON-serialisable.
    """
    y_true, y_pred = _numpy(y_true), _numpy(y_pred)
    if y_pred.ndim == 2:
        if y_pred.shape[1] != num_classes:
            raise ValueError(f'y_pred has {y_pred.shape[1]} scores per sample; expected num_classes={num_classes}.')
        y_pred = y_pred.argmax(axis=1)
    if y_true.ndim == 1 and y_true.shape == y_pred.shape:
        labelled = y_true != -1
        y_true, y_pred = y_true[labelled], y_pred[labelled]
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = cm.sum()
    if n == 0:
        raise ValueError('no samples to evaluate (y_true is empty or all -1).')
    tp = np.diag(cm)
    per_class = f1_from_counts(tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp)
    return dict(f1=float(per_class.mean()), accuracy=float(tp.sum() / n), per_class_f1=per_class.tolist(),
                confusion=cm.tolist(), num_samples=int(n))


def au_metrics(y_true, probs, threshold: float = 0.5, au_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Per-AU F1 and mean AU F1, counting for each AU only the samples where it is labelled.

    Args:
        y_true: (N, A) targets, 1 = present, 0 = absent, NaN = not labelled.
        probs: (N, A) predicted probabilities (apply a sigmoid to logits first); present when >= threshold.
        threshold: decision threshold on probs.
        au_names: names of the A columns, the keys of the returned dicts; default the column positions '0', '1', ...

    Returns:
        dict with `per_au_f1` ({name: F1, NaN for an AU with no labelled sample}), `mean_f1` (mean over the AUs
        with at least one labelled sample; NaN if there is none) and `labelled` ({name: number of labelled samples}).
    """
    y_true = _numpy(y_true).astype(np.float64)
    probs = _numpy(probs).astype(np.float64)
    if y_true.ndim != 2 or y_true.shape != probs.shape:
        raise ValueError(f'y_true and probs must both be (N, A); got {y_true.shape} and {probs.shape}.')
    names = [str(a) for a in au_names] if au_names is not None else [str(i) for i in range(y_true.shape[1])]
    if len(names) != y_true.shape[1]:
        raise ValueError(f'{len(names)} AU names for {y_true.shape[1]} AU columns.')
    labelled = ~np.isnan(y_true)
    bad = labelled & (y_true != 0) & (y_true != 1)
    if bad.any():
        raise ValueError(f'AU targets must be 0, 1 or NaN; found {y_true[bad][0]!r}.')
    if np.isnan(probs[labelled]).any():
        raise ValueError('probs contain NaN where the target is labelled.')
    truth = labelled & (y_true == 1)
    pred = labelled & (probs >= threshold)
    tp = (truth & pred).sum(axis=0)
    fp = (~truth & pred).sum(axis=0)
    fn = (truth & ~pred).sum(axis=0)
    count = labelled.sum(axis=0)
    f1 = np.where(count > 0, f1_from_counts(tp, fp, fn), np.nan)
    scored = f1[count > 0]
    return dict(per_au_f1=dict(zip(names, f1.tolist())),
                mean_f1=float(scored.mean()) if scored.size else float('nan'),
                labelled=dict(zip(names, count.tolist())))


def _numpy(x) -> np.ndarray:
    """An array from a list, numpy array or torch tensor (on any device), without importing torch."""
    if hasattr(x, 'detach'):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_labels(y, what: str, num_classes: int) -> np.ndarray:
    y = _numpy(y)
    if y.ndim != 1:
        raise ValueError(f'{what} must be 1-D class indices; got shape {y.shape}.')
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f'{what} must hold integer class indices.')
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f'{what} has class index {int(y.min() if y.min() < 0 else y.max())} outside '
                         f'0..{num_classes - 1}.')
    return y
