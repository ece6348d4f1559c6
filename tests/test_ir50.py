"""face.evoLVe IR-50 compatibility: original key names load strictly, and compute what the original computes."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import aucvt_zoo  # noqa: F401  (registers the models)
from aucvt_zoo.models.ir50 import remap_evolve_state_dict

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'authors-state-dict-7regions.tsv')


def _bn(prefix, chs, sd, gen):
    sd[prefix + 'weight'] = torch.rand(chs, generator=gen) + 0.5
    sd[prefix + 'bias'] = torch.randn(chs, generator=gen) * 0.1
    sd[prefix + 'running_mean'] = torch.randn(chs, generator=gen) * 0.1
    sd[prefix + 'running_var'] = torch.rand(chs, generator=gen) + 0.5
    sd[prefix + 'num_batches_tracked'] = torch.tensor(100)


def evolve_ir50_state_dict(seed=0, layers=(3, 4, 14, 3), channels=(64, 128, 256, 512)):
    """A state dict with face.evoLVe's exact IR-50 key names and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {'input_layer.0.weight': torch.randn(channels[0], 3, 3, 3, generator=gen) * 0.2}
    _bn('input_layer.1.', channels[0], sd, gen)
    sd['input_layer.2.weight'] = torch.rand(channels[0], generator=gen) * 0.3
    unit, in_chs = 0, channels[0]
    for depth, out_chs in zip(layers, channels):
        for u in range(depth):
            p = f'body.{unit}.'
            if in_chs != out_chs:
                sd[p + 'shortcut_layer.0.weight'] = torch.randn(out_chs, in_chs, 1, 1, generator=gen) * 0.1
                _bn(p + 'shortcut_layer.1.', out_chs, sd, gen)
            _bn(p + 'res_layer.0.', in_chs, sd, gen)
            sd[p + 'res_layer.1.weight'] = torch.randn(out_chs, in_chs, 3, 3, generator=gen) * 0.05
            sd[p + 'res_layer.2.weight'] = torch.rand(out_chs, generator=gen) * 0.3
            sd[p + 'res_layer.3.weight'] = torch.randn(out_chs, out_chs, 3, 3, generator=gen) * 0.05
            _bn(p + 'res_layer.4.', out_chs, sd, gen)
            unit, in_chs = unit + 1, out_chs
    # the face-embedding head: BN2d, Dropout, Flatten, Linear(512*7*7, 512), BN1d
    _bn('output_layer.0.', 512, sd, gen)
    sd['output_layer.3.weight'] = torch.randn(512, 512 * 7 * 7, generator=gen) * 0.01
    sd['output_layer.3.bias'] = torch.zeros(512)
    _bn('output_layer.4.', 512, sd, gen)
    return sd


def test_generated_keys_match_the_authors_listing():
    if not os.path.exists(REFERENCE):
        pytest.skip('shared/reference not beside the checkout')
    listed = {}
    for line in open(REFERENCE):
        key, shape = line.rstrip('\n').split('\t')
        if key.startswith('cnn.'):
            listed[key[4:]] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    ours = {k: tuple(v.shape) for k, v in evolve_ir50_state_dict().items() if k in listed}
    assert ours == listed  # units 0-20 and the stem, exactly as the original code names and shapes them


def _reference_stem_and_first_unit(sd, x):
    """The original computation, written from face.evoLVe's definitions with functional ops."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            training=False, eps=1e-5)
    stem = F.prelu(bn(F.conv2d(x, sd['input_layer.0.weight'], padding=1), 'input_layer.1.'), sd['input_layer.2.weight'])
    r = bn(stem, 'body.0.res_layer.0.')
    r = F.conv2d(r, sd['body.0.res_layer.1.weight'], padding=1)
    r = F.prelu(r, sd['body.0.res_layer.2.weight'])
    r = F.conv2d(r, sd['body.0.res_layer.3.weight'], stride=2, padding=1)
    r = bn(r, 'body.0.res_layer.4.')
    shortcut = F.max_pool2d(stem, kernel_size=1, stride=2)
    return stem, r + shortcut


def test_original_checkpoint_loads_strictly_and_computes_the_same():
    sd = evolve_ir50_state_dict()
    model = timm.create_model('ir50', num_classes=0).eval()
    from aucvt_zoo.models.ir50 import checkpoint_filter_fn
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    x = torch.randn(2, 3, 112, 112)
    stem_ref, unit_ref = _reference_stem_and_first_unit(sd, x)
    with torch.no_grad():
        stem = model.stem(x)
        unit = model.stages[0][0](stem)
    torch.testing.assert_close(stem, stem_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unit, unit_ref, rtol=1e-4, atol=1e-5)


def test_original_checkpoint_through_timm_pretrained_path(tmp_path):
    path = tmp_path / 'backbone_ir50_ms1m_epoch120.pth'
    torch.save(evolve_ir50_state_dict(), path)
    model = timm.create_model('ir50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stem[0].weight, evolve_ir50_state_dict()['input_layer.0.weight'])
    assert model.head.fc.out_features == 6  # a new expression head on the face-recognition backbone


def test_truncated_embedding_for_cvt_keeps_units_0_to_20():
    sd = evolve_ir50_state_dict()
    renamed, dropped = remap_evolve_state_dict(sd, (3, 4, 14), prefix='trunk.')
    assert {k.split('.')[1] for k in dropped if k.startswith('body.')} == {'21', '22', '23'}
    assert all(k.startswith('output_layer.') or k.startswith('body.2') for k in dropped)
    assert torch.equal(renamed['trunk.stages.2.13.residual.3.weight'], sd['body.20.res_layer.3.weight'])
    assert torch.equal(renamed['trunk.stages.1.0.shortcut.0.weight'], sd['body.3.shortcut_layer.0.weight'])
    model = timm.create_model('cvt_ir50')
    model.load_trunk_state_dict(sd)  # strict inside
    assert torch.equal(model.trunk.stages[2][13].residual[3].weight, sd['body.20.res_layer.3.weight'])


def test_partial_original_checkpoint_is_refused_by_name():
    sd = evolve_ir50_state_dict()
    del sd['body.5.res_layer.1.weight']
    model = timm.create_model('cvt_ir50')
    with pytest.raises(RuntimeError, match='stages.1.2.residual.1.weight'):
        model.load_trunk_state_dict(sd)
