"""The AU branch: which grid cells feed which AU logits, and symmetric maxout."""
import pytest
import torch

from aucvt_zoo.labels import AU_SETS, REGION_LAYOUTS, regions_for
from aucvt_zoo.models import AuBranch

DIM = 8


def _branch(aus='rafau21', layout='paper7', grid=(14, 14)):
    torch.manual_seed(0)
    return AuBranch(DIM, aus, layout=layout, grid=grid).eval()


def _cells_of(layout, au, grid=(14, 14)):
    """Grid cells of every region that predicts `au` (the union of a symmetric pair)."""
    mask = torch.zeros(grid, dtype=torch.bool)
    for region, aus in regions_for((au,), layout):
        r0, r1, c0, c1 = region.cells(*grid)
        mask[r0:r1, c0:c1] = True
    return mask


@pytest.mark.parametrize('layout,aus', [('paper7', 'rafau21'), ('paper7', 'openface16'), ('released2', 'openface16')])
def test_each_au_logit_reads_exactly_its_regions(layout, aus):
    branch = _branch(aus, layout)
    x = torch.randn(1, 14, 14, DIM, requires_grad=True)
    logits = branch(x)
    assert logits.shape == (1, len(AU_SETS[aus]))
    for i, au in enumerate(branch.au_names):
        grad, = torch.autograd.grad(logits[0, i], x, retain_graph=True)
        touched = grad.abs().sum(-1)[0] > 0
        # a maxout AU reads the winning side only; that side lies inside the pair's union, and covers its box
        inside = _cells_of(layout, au)
        assert touched.any() and not (touched & ~inside).any(), au
        winner = [r for r, a in regions_for((au,), layout) if touched[r.cells(14, 14)[0], r.cells(14, 14)[2]]]
        assert winner, au
        r0, r1, c0, c1 = winner[0].cells(14, 14)
        assert touched[r0:r1, c0:c1].all(), au


def test_nose_box_feeds_au9_only_inside_rows_4_to_10_cols_4_to_10():
    branch = _branch('rafau21')
    x = torch.randn(1, 14, 14, DIM, requires_grad=True)
    au9 = branch(x)[0, branch.au_names.index('AU9')]
    grad, = torch.autograd.grad(au9, x)
    touched = (grad.abs().sum(-1)[0] > 0).nonzero()
    assert touched[:, 0].min() == 4 and touched[:, 0].max() == 9
    assert touched[:, 1].min() == 4 and touched[:, 1].max() == 9


def test_symmetric_maxout_follows_the_active_eye_and_its_mirror():
    branch = _branch('openface16')
    left, right = branch.regions['eye_left'], branch.regions['eye_right']
    pattern = torch.linspace(-3, 3, DIM)
    with torch.no_grad():  # heads that answer the pattern with positive logits and a blank eye with 0
        left.fc.weight.copy_(torch.outer(torch.arange(1.0, 5.0), left.norm(pattern[None])[0]))
        left.fc.bias.zero_()
    right.load_state_dict(left.state_dict())  # mirror-symmetric heads, so a mirrored face gives the same logits
    eye_aus = [branch.au_names.index(a) for a in ('AU1', 'AU2', 'AU5', 'AU7')]

    active = torch.zeros(1, 14, 14, DIM)
    r0, r1, c0, c1 = branch.region_cells['eye_left']
    active[0, r0:r1, c0:c1 - 3] = pattern  # only the image-left eye box is active (and not its overlap)
    active.requires_grad_(True)
    left_logits = branch(active)[0, eye_aus]
    pooled = active[0, r0:r1, c0:c1].mean((0, 1))
    torch.testing.assert_close(left_logits, left(pooled[None])[0])
    assert (left_logits > 0).all()
    grad, = torch.autograd.grad(left_logits.sum(), active)
    touched = grad.abs().sum(-1)[0] > 0
    assert touched[r0:r1, c0:c1].all() and not touched[:, c1:].any()

    mirrored = active.detach().flip(2).requires_grad_(True)  # the same activity on the image-right eye
    right_logits = branch(mirrored)[0, eye_aus]
    torch.testing.assert_close(right_logits, left_logits)
    grad, = torch.autograd.grad(right_logits.sum(), mirrored)
    touched = grad.abs().sum(-1)[0] > 0
    r0, r1, c0, c1 = branch.region_cells['eye_right']
    assert touched[r0:r1, c0:c1].all() and not touched[:, :c0].any()  # it came from the right side


def test_cheek_pair_is_maxed_and_other_aus_are_not():
    branch = _branch('rafau21')
    assert branch.gather_index.shape == (2, 21)
    au6 = branch.au_names.index('AU6')
    assert branch.gather_index[0, au6] != branch.gather_index[1, au6]
    au12 = branch.au_names.index('AU12')
    assert branch.gather_index[0, au12] == branch.gather_index[1, au12]


def test_regions_scale_to_other_maps_and_reject_wrong_ones():
    branch = _branch('openface16', grid=(12, 12))
    assert branch(torch.randn(2, 12, 12, DIM)).shape == (2, 16)
    with pytest.raises(AssertionError, match='12x12'):
        branch(torch.randn(2, 14, 14, DIM))


def test_pooling_matrix_averages_each_box():
    branch = _branch('rafau21')
    for i, (name, (r0, r1, c0, c1)) in enumerate(branch.region_cells.items()):
        weights = branch.pool_weights[i].view(14, 14)
        assert torch.isclose(weights.sum(), torch.tensor(1.0))
        assert (weights[r0:r1, c0:c1] > 0).all() and weights.count_nonzero() == (r1 - r0) * (c1 - c0), name
    assert [r.name for r in REGION_LAYOUTS['paper7']] == list(branch.region_cells)


def test_batch_size_one_and_empty_au_list():
    assert _branch(['AU12'])(torch.randn(1, 14, 14, DIM)).shape == (1, 1)
    with pytest.raises(ValueError, match='at least one AU'):
        AuBranch(DIM, [])
