import math

import pytest
import timm
import torch
import torch.nn.functional as F

import aucvt_zoo  # noqa: F401  (registers the models)
from aucvt_zoo.losses import JointLoss, label_counts

NAN = float('nan')


def _batch():
    g = torch.Generator().manual_seed(1)
    expr_logits = torch.randn(4, 6, generator=g, requires_grad=True)
    au_logits = torch.randn(4, 3, generator=g, requires_grad=True)
    expressions = torch.tensor([2, -1, 5, -1])
    aus = torch.tensor([[1., 0., NAN], [NAN, NAN, NAN], [0., 1., 1.], [1., NAN, 0.]])
    return expr_logits, au_logits, expressions, aus


def test_fully_labelled_batch_is_plain_ce_plus_bce():
    expr_logits, au_logits = torch.randn(3, 6), torch.randn(3, 2)
    expressions, aus = torch.tensor([0, 3, 5]), torch.tensor([[1., 0.], [0., 0.], [1., 1.]])
    total, parts = JointLoss(alpha=0.7, beta=2.)(expr_logits, au_logits, expressions, aus)
    ce = F.cross_entropy(expr_logits, expressions)
    bce = F.binary_cross_entropy_with_logits(au_logits, aus)
    torch.testing.assert_close(parts['expression'], ce)
    torch.testing.assert_close(parts['au'], bce)
    torch.testing.assert_close(total, 0.7 * ce + 2. * bce)


def test_each_term_averages_over_its_own_labels():
    expr_logits, au_logits, expressions, aus = _batch()
    _, parts = JointLoss()(expr_logits, au_logits, expressions, aus)
    keep = expressions >= 0
    torch.testing.assert_close(parts['expression'], F.cross_entropy(expr_logits[keep], expressions[keep]))
    mask = ~torch.isnan(aus)
    torch.testing.assert_close(parts['au'], F.binary_cross_entropy_with_logits(au_logits[mask], aus[mask]))
    assert label_counts(expressions, aus) == (2, 7)


def test_unlabelled_samples_get_no_gradient():
    expr_logits, au_logits, expressions, aus = _batch()
    total, _ = JointLoss()(expr_logits, au_logits, expressions, aus)
    total.backward()
    assert torch.all(expr_logits.grad[1] == 0) and torch.all(expr_logits.grad[3] == 0)
    assert torch.all(au_logits.grad[1] == 0) and au_logits.grad[0, 2] == 0 and au_logits.grad[3, 1] == 0
    assert torch.all(expr_logits.grad[0] != 0) and torch.all(au_logits.grad[2] != 0)


@pytest.mark.parametrize('which', ['expression', 'au', 'both'])
def test_batch_without_labels_gives_zero_not_nan(which):
    expr_logits, au_logits, expressions, aus = _batch()
    if which in ('expression', 'both'):
        expressions = torch.full_like(expressions, -1)
    if which in ('au', 'both'):
        aus = torch.full_like(aus, NAN)
    # an extreme logit in a masked-out entry must not leak inf/NaN either
    with torch.no_grad():
        au_logits[1, 0] = float("inf")
    total, parts = JointLoss()(expr_logits, au_logits, expressions, aus)
    total.backward()
    assert math.isfinite(total.item())
    if which != 'au':
        assert parts['expression'].item() == 0.
    if which != 'expression':
        assert parts['au'].item() == 0.
    assert torch.isfinite(expr_logits.grad).all() and torch.isfinite(au_logits.grad).all()
    if which == 'both':
        assert total.item() == 0. and not expr_logits.grad.any() and not au_logits.grad.any()


def test_model_without_au_branch_trains_on_ce_only():
    expr_logits = torch.randn(2, 6)
    total, parts = JointLoss()(expr_logits, torch.zeros(2, 0), torch.tensor([1, 4]), torch.zeros(2, 0))
    torch.testing.assert_close(total, F.cross_entropy(expr_logits, torch.tensor([1, 4])))
    assert parts['au'].item() == 0.


def test_explicit_norms_match_one_big_batch():
    # two halves, each divided by the count of the whole batch, sum to the whole batch's mean loss
    expr_logits, au_logits, expressions, aus = _batch()
    loss = JointLoss()
    whole, _ = loss(expr_logits, au_logits, expressions, aus)
    n_expr, n_au = label_counts(expressions, aus)
    halves = sum(
        loss(expr_logits[s], au_logits[s], expressions[s], aus[s], expression_norm=n_expr, au_norm=n_au)[0]
        for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, whole)


def test_au_shape_mismatch_says_what_to_do():
    with pytest.raises(ValueError, match='model.au_names'):
        JointLoss()(torch.randn(2, 6), torch.randn(2, 16), torch.tensor([0, 1]), torch.zeros(2, 21))


def test_au_loss_reaches_the_shared_trunk_and_masks_unlabelled_images():
    model = timm.create_model('aucvt_openface_tiny').eval()  # eval: BatchNorm must not couple the samples
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    aus = torch.full((2, len(model.au_names)), NAN)
    aus[0, model.au_names.index('AU12')] = 1.
    expr_logits, au_logits = model.forward_with_aus(x)
    total, _ = JointLoss(alpha=0., beta=1.)(expr_logits, au_logits, torch.tensor([-1, -1]), aus)
    total.backward()
    # the AU term alone moves the IR trunk and the first transformer stage, which the emotion branch shares
    assert model.trunk.stem[0].weight.grad.abs().sum() > 0
    assert model.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # ...and nothing of the expression-only layers, nor of the image without AU labels
    assert model.head.weight.grad is None or not model.head.weight.grad.any()
    assert x.grad[0].abs().sum() > 0 and not x.grad[1].any()
