"""Metric functions against hand-computed values, and against scikit-learn when it is installed."""
import math

import numpy as np
import pytest

from aucvt_zoo.metrics import au_metrics, confusion_matrix, expression_metrics, f1_from_counts


def test_expression_metrics_by_hand():
    # true:  0 0 1 1 2 3 4 5 5 5
    # pred:  0 1 1 1 2 3 5 5 5 4
    y_true = [0, 0, 1, 1, 2, 3, 4, 5, 5, 5]
    y_pred = [0, 1, 1, 1, 2, 3, 5, 5, 5, 4]
    m = expression_metrics(y_true, y_pred)
    # class 0: tp 1 fp 0 fn 1 -> 2/3; class 1: tp 2 fp 1 fn 0 -> 4/5; classes 2, 3: 1;
    # class 4: tp 0 -> 0; class 5: tp 2 fp 1 fn 1 -> 4/6
    expected = [2 / 3, 4 / 5, 1.0, 1.0, 0.0, 4 / 6]
    assert m['per_class_f1'] == pytest.approx(expected)
    assert m['f1'] == pytest.approx(sum(expected) / 6)
    assert m['accuracy'] == pytest.approx(7 / 10)
    assert m['confusion'][0] == [1, 1, 0, 0, 0, 0]
    assert m['confusion'][5] == [0, 0, 0, 0, 1, 2]
    assert sum(map(sum, m['confusion'])) == 10


def test_expression_metrics_takes_logits():
    logits = np.array([[3.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    assert expression_metrics([0, 4], logits)['per_class_f1'][0] == 1.0
    assert expression_metrics([0, 4], logits)['accuracy'] == 0.5


def test_unlabelled_samples_and_tensors():
    torch = pytest.importorskip('torch')
    m = expression_metrics(torch.tensor([0, -1, 1, -1]), torch.tensor([0, 1, 0, 1]))
    assert m['num_samples'] == 2 and m['accuracy'] == 0.5
    assert m['confusion'][0][0] == 1 and m['confusion'][1][0] == 1 and sum(map(sum, m['confusion'])) == 2
    a = au_metrics(torch.tensor([[1.0], [float('nan')]]), torch.tensor([[0.9], [0.9]]))
    assert a['per_au_f1'] == {'0': 1.0}


def test_zero_division_convention():
    """A class with no true and no predicted sample scores F1 0 and still counts in the 6-class macro mean."""
    m = expression_metrics([0, 1, 1], [0, 1, 1])
    assert m['per_class_f1'] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert m['f1'] == pytest.approx(2 / 6) and m['accuracy'] == 1.0
    assert f1_from_counts([0, 0], [0, 1], [0, 0]).tolist() == [0.0, 0.0]


def test_expression_metrics_rejects():
    with pytest.raises(ValueError, match='outside 0..5'):
        expression_metrics([0, -2], [0, 1])
    with pytest.raises(ValueError, match='all -1'):
        expression_metrics([-1], [0])
    with pytest.raises(ValueError, match='outside 0..5'):
        expression_metrics([0, 1], [0, 6])
    with pytest.raises(ValueError, match='2 samples but y_pred has 3'):
        expression_metrics([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match='no samples'):
        expression_metrics([], [])
    with pytest.raises(ValueError, match='integer'):
        expression_metrics([0.5], [0])
    with pytest.raises(ValueError, match='num_classes=6'):
        expression_metrics([0], np.zeros((1, 7)))


def test_confusion_matrix_orientation():
    cm = confusion_matrix([2, 2, 0], [1, 2, 2], num_classes=3)
    assert cm.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 1]]  # rows true, columns predicted


def test_au_metrics_by_hand_with_unlabelled():
    nan = float('nan')
    y = np.array([[1, 0, nan],
                  [1, nan, nan],
                  [0, 1, nan],
                  [nan, 1, nan]])
    p = np.array([[0.9, 0.2, 0.9],
                  [0.4, 0.99, 0.1],   # AU2 unlabelled here: its 0.99 must not count as a false positive
                  [0.5, 0.7, 0.1],    # 0.5 >= threshold counts as predicted present
                  [0.99, 0.1, 0.9]])  # AU1 unlabelled here
    m = au_metrics(y, p, au_names=['AU1', 'AU2', 'AU4'])
    # AU1 on rows 0-2: tp 1 (row 0), fn 1 (row 1), fp 1 (row 2) -> 2/4; AU2 on rows 0, 2, 3: tp 1, fn 1 -> 2/3
    assert m['per_au_f1']['AU1'] == pytest.approx(0.5)
    assert m['per_au_f1']['AU2'] == pytest.approx(2 / 3)
    assert math.isnan(m['per_au_f1']['AU4'])  # never labelled: nothing to score, left out of the mean
    assert m['mean_f1'] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m['labelled'] == {'AU1': 3, 'AU2': 3, 'AU4': 0}
    assert au_metrics(y, p, threshold=0.6)['per_au_f1']['0'] == pytest.approx(2 / 3)  # row 2 no longer positive


def test_au_metrics_labelled_but_never_present_scores_zero():
    m = au_metrics(np.zeros((3, 1)), np.zeros((3, 1)))
    assert m['per_au_f1'] == {'0': 0.0} and m['mean_f1'] == 0.0


def test_au_metrics_rejects():
    with pytest.raises(ValueError, match=r'\(N, A\)'):
        au_metrics(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match='0, 1 or NaN'):
        au_metrics(np.array([[0.5]]), np.array([[0.5]]))
    with pytest.raises(ValueError, match='2 AU names for 1'):
        au_metrics(np.zeros((1, 1)), np.zeros((1, 1)), au_names=['AU1', 'AU2'])
    with pytest.raises(ValueError, match='probs contain NaN'):
        au_metrics(np.ones((1, 1)), np.full((1, 1), np.nan))
    assert math.isnan(au_metrics(np.full((2, 1), np.nan), np.zeros((2, 1)))['mean_f1'])


@pytest.mark.parametrize('seed', range(5))
def test_expression_metrics_match_sklearn(seed):
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(seed)
    n = 50
    y_true = rng.integers(0, 6, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, 6, n))
    if seed == 0:
        y_true[y_true == 4] = 3  # class 4 absent from the truth; its F1 is 0 if ever predicted
        y_pred[y_pred == 4] = 3
    m = expression_metrics(y_true, y_pred)
    labels = list(range(6))
    assert m['f1'] == pytest.approx(metrics.f1_score(y_true, y_pred, labels=labels, average='macro',
                                                     zero_division=0.0))
    assert m['per_class_f1'] == pytest.approx(metrics.f1_score(y_true, y_pred, labels=labels, average=None,
                                                               zero_division=0.0).tolist())
    assert m['accuracy'] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert m['confusion'] == metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()


@pytest.mark.parametrize('seed', range(3))
def test_au_metrics_match_sklearn(seed):
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (40, 5)).astype(float)
    y[rng.random(y.shape) < 0.3] = np.nan
    probs = rng.random(y.shape)
    m = au_metrics(y, probs, threshold=0.4)
    expected = []
    for a in range(5):
        keep = ~np.isnan(y[:, a])
        expected.append(metrics.f1_score(y[keep, a], probs[keep, a] >= 0.4, zero_division=0.0))
    assert list(m['per_au_f1'].values()) == pytest.approx(expected)
    assert m['mean_f1'] == pytest.approx(np.mean(expected))
