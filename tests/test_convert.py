"""Converters: face.evoLVe IR-50, the authors' AU-CVT checkpoints, the zoo's own checkpoints -> Hub releases.

State dicts are generated here with the original key names (from the layouts in docs/weights.md and the authors'
key lists in tests/data/), never derived from our modules, and the authors' forward pass is re-implemented below
from their layout so the converted model is checked against it, not against itself.
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aucvt_zoo  # noqa: F401  (registers the models)
import timm
from aucvt_zoo import benchmark, convert
from aucvt_zoo.convert import ConversionError
from aucvt_zoo.hub import read_weight_facts, sha256_file

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub, use_endpoint  # noqa: E402

DATA = Path(__file__).parent / 'data'
ROOT = Path(__file__).parent.parent

# rafau21 order of the authors' 7-region output: eye max 0:2, AU12 head, eye max 2, cheek max, eye max 3, AU22, mouth
RAF21 = ('AU1', 'AU2', 'AU4', 'AU5', 'AU6', 'AU7', 'AU9', 'AU10', 'AU12', 'AU14', 'AU15', 'AU16', 'AU17', 'AU18',
         'AU20', 'AU22', 'AU23', 'AU24', 'AU25', 'AU26', 'AU27')
# the authors' boxes on the 14x14 map (rows, cols), from their layout table
BOXES7 = {'AU11': (0, 7, 0, 7), 'AU12': (0, 7, 4, 10), 'AU13': (0, 7, 7, 14), 'AU21': (5, 12, 0, 6),
          'AU22': (4, 10, 4, 10), 'AU23': (5, 12, 8, 14), 'AU3': (6, 14, 0, 14)}
OUTS7 = {'AU11': 4, 'AU12': 1, 'AU13': 4, 'AU21': 1, 'AU22': 1, 'AU23': 1, 'AU3': 14}


# --- generated checkpoints in the original layouts ----------------------------------------------------------------
def _bn(sd, prefix, c, g):
    sd[prefix + 'weight'] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[prefix + 'bias'] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + 'running_mean'] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + 'running_var'] = 0.5 + torch.rand(c, generator=g)
    sd[prefix + 'num_batches_tracked'] = torch.tensor(100)


def _conv(shape, g):
    fan_in = math.prod(shape[1:])
    return torch.randn(*shape, generator=g) / math.sqrt(fan_in)


def evolve_state_dict(layers=(3, 4, 14, 3), channels=(64, 128, 256, 512), prefix='', embedding_head=True, seed=0):
    """A face.evoLVe IR state dict: input_layer.{0,1,2}, body.N.res_layer.{0..4}, body.N.shortcut_layer.{0,1}."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd[prefix + 'input_layer.0.weight'] = _conv((channels[0], 3, 3, 3), g)
    _bn(sd, prefix + 'input_layer.1.', channels[0], g)
    sd[prefix + 'input_layer.2.weight'] = 0.25 + 0.05 * torch.randn(channels[0], generator=g)
    unit, in_c = 0, channels[0]
    for depth, out_c in zip(layers, channels):
        for i in range(depth):
            c_in = in_c if i == 0 else out_c
            p = f'{prefix}body.{unit}.'
            if c_in != out_c:
                sd[p + 'shortcut_layer.0.weight'] = _conv((out_c, c_in, 1, 1), g)
                _bn(sd, p + 'shortcut_layer.1.', out_c, g)
            _bn(sd, p + 'res_layer.0.', c_in, g)
            sd[p + 'res_layer.1.weight'] = _conv((out_c, c_in, 3, 3), g)
            sd[p + 'res_layer.2.weight'] = 0.25 + 0.05 * torch.randn(out_c, generator=g)
            sd[p + 'res_layer.3.weight'] = _conv((out_c, out_c, 3, 3), g)
            _bn(sd, p + 'res_layer.4.', out_c, g)
            unit += 1
        in_c = out_c
    if embedding_head:
        _bn(sd, prefix + 'output_layer.0.', channels[-1], g)
        sd[prefix + 'output_layer.3.weight'] = _conv((512, channels[-1] * 49), g)
        sd[prefix + 'output_layer.3.bias'] = torch.zeros(512)
    return sd


def authors_state_dict(regions=7, dim=64, depths=(2, 1), seed=0):
    """A small checkpoint of the authors' code (their key names, narrow widths), wrapped and DataParallel-prefixed."""
    g = torch.Generator().manual_seed(seed)
    sd = {'cnn.' + k: v for k, v in evolve_state_dict((1, 1, 2), (16, 32, 64), embedding_head=False, seed=seed).items()}
    sd['norm.weight'], sd['norm.bias'] = torch.ones(196, 64), torch.zeros(196, 64)
    sd['vit.pos_embed'] = 0.02 * torch.randn(1, 196, dim, generator=g)
    sd['vit.pools.0.conv.weight'], sd['vit.pools.0.conv.bias'] = torch.randn(dim, 1, 3, 3), torch.zeros(dim)
    sd['vit.pos_block.0.proj.0.weight'], sd['vit.pos_block.0.proj.0.bias'] = torch.randn(dim, 1, 3, 3), torch.zeros(dim)
    sd['vit.patch_embed.weight'] = _conv((dim, 64, 3, 3), g)
    sd['vit.patch_embed.bias'] = 0.1 * torch.randn(dim, generator=g)

    def linear(name, out_f, in_f):
        sd[name + '.weight'] = _conv((out_f, in_f), g)
        sd[name + '.bias'] = 0.05 * torch.randn(out_f, generator=g)

    def norm(name):
        sd[name + '.weight'] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[name + '.bias'] = 0.1 * torch.randn(dim, generator=g)

    for s, depth in enumerate(depths):
        for b in range(depth):
            p = f'vit.transformers.{s}.blocks.{b}.'
            norm(p + 'norm1')
            linear(p + 'attn.qkv', 3 * dim, dim)
            linear(p + 'attn.proj', dim, dim)
            norm(p + 'norm2')
            linear(p + 'mlp.fc1', 4 * dim, dim)
            linear(p + 'mlp.fc2', dim, 4 * dim)
    norm('vit.norm')
    if regions == 7:
        for r, n in OUTS7.items():
            norm(f'vit.norm_{r}')
            linear(f'vit.head_{r}', n, dim)
    elif regions == 2:
        norm('vit.norm_AU_up')
        norm('vit.norm_AU_low')
        linear('vit.upperAU_head', 7, dim)
        linear('vit.lowerAU_head', 9, dim)
    linear('vit.output_layer.2', dim, 196 * dim)
    linear('vit.head', 6, dim)
    return {'model': {'module.' + k: v for k, v in sd.items()}, 'args': argparse.Namespace(lr=1e-4, bs=512), 'iter': 7}


# --- the authors' forward pass, re-implemented from their layout --------------------------------------------------
def reference_forward(sd, x, stage_starts=(0, 1, 2), regions=7):
    """Expression and AU logits of the authors' model: IR stem/units, conv embed + pos, blocks, AU heads, head."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            False, 0., 1e-5)

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + '.weight'], sd[p + '.bias'], 1e-6)

    def lin(t, p):
        return t @ sd[p + '.weight'].T + sd[p + '.bias']

    x = F.prelu(bn(F.conv2d(x, sd['cnn.input_layer.0.weight'], padding=1), 'cnn.input_layer.1.'),
                sd['cnn.input_layer.2.weight'])
    n_units = len({k.split('.')[2] for k in sd if k.startswith('cnn.body.')})
    for u in range(n_units):
        p, stride = f'cnn.body.{u}.', 2 if u in stage_starts else 1
        if p + 'shortcut_layer.0.weight' in sd:
            shortcut = bn(F.conv2d(x, sd[p + 'shortcut_layer.0.weight'], stride=stride), p + 'shortcut_layer.1.')
        else:
            shortcut = x[:, :, ::stride, ::stride]  # MaxPool2d(kernel 1, stride s)
        r = bn(x, p + 'res_layer.0.')
        r = F.prelu(F.conv2d(r, sd[p + 'res_layer.1.weight'], padding=1), sd[p + 'res_layer.2.weight'])
        r = bn(F.conv2d(r, sd[p + 'res_layer.3.weight'], stride=stride, padding=1), p + 'res_layer.4.')
        x = r + shortcut
    t = F.conv2d(x, sd['vit.patch_embed.weight'], sd['vit.patch_embed.bias'], padding=1)
    B, C, H, W = t.shape
    t = t.flatten(2).transpose(1, 2) + sd['vit.pos_embed']  # row-major tokens

    def block(t, p):
        heads = C // 32
        qkv = lin(ln(t, p + 'norm1'), p + 'attn.qkv').reshape(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) * (C // heads) ** -0.5, dim=-1)
        t = t + lin((attn @ v).transpose(1, 2).reshape(B, H * W, C), p + 'attn.proj')
        return t + lin(F.gelu(lin(ln(t, p + 'norm2'), p + 'mlp.fc1')), p + 'mlp.fc2')

    def blocks(t, s):
        n = len({k.split('.')[4] for k in sd if k.startswith(f'vit.transformers.{s}.blocks.')})
        for b in range(n):
            t = block(t, f'vit.transformers.{s}.blocks.{b}.')
        return t

    t = blocks(t, 0)
    grid = t.reshape(B, H, W, C)

    def region(r0, r1, c0, c1, norm, head):
        return lin(ln(grid[:, r0:r1, c0:c1].mean(dim=(1, 2)), norm), head)

    if regions == 7:
        o = {r: region(*BOXES7[r], f'vit.norm_{r}', f'vit.head_{r}') for r in BOXES7}
        eye, cheek = torch.maximum(o['AU11'], o['AU13']), torch.maximum(o['AU21'], o['AU23'])
        aus = torch.cat([eye[:, 0:2], o['AU12'], eye[:, 2:3], cheek, eye[:, 3:4], o['AU22'], o['AU3']], dim=1)
    elif regions == 2:
        aus = torch.cat([region(0, 8, 0, 14, 'vit.norm_AU_up', 'vit.upperAU_head'),
                         region(6, 14, 0, 14, 'vit.norm_AU_low', 'vit.lowerAU_head')], dim=1)
    else:
        aus = t.new_zeros(B, 0)
    t = blocks(t, 1)
    return lin(ln(t.mean(dim=1), 'vit.norm'), 'vit.head'), aus


def _strip(checkpoint):
    return {k[len('module.'):]: v for k, v in checkpoint['model'].items()}


# --- face.evoLVe --------------------------------------------------------------------------------------------------
def test_evolve_round_trip_ir50_and_cvt_embedding_strict():
    source = evolve_state_dict()
    converted, report = convert.convert_evolve(source, 'ir50')
    assert report['layers'] == (3, 4, 14, 3)
    assert sorted(report['dropped']) == sorted(k for k in source if k.startswith('output_layer.'))
    ir50 = convert.build_converted(converted, report)  # strict=True inside
    assert torch.equal(ir50.stages[1][2].residual[1].weight, source['body.5.res_layer.1.weight'])
    assert torch.equal(ir50.stages[3][0].shortcut[0].weight, source['body.21.shortcut_layer.0.weight'])

    embedding, report = convert.convert_evolve(source, 'embedding')
    dropped_units = sorted({int(k.split('.')[1]) for k in report['dropped'] if k.startswith('body.')})
    assert dropped_units == [21, 22, 23]
    kept_units = {k.split('.')[1] + '.' + k.split('.')[2] for k in embedding if k.startswith('stages.')}
    assert len(kept_units) == 21  # units 0-20, exactly
    cvt = timm.create_model('cvt_ir50')
    cvt.load_trunk_state_dict(embedding)  # strict inside
    assert set(embedding) == set(cvt.trunk.state_dict())
    assert torch.equal(cvt.trunk.stages[2][13].residual[3].weight, source['body.20.res_layer.3.weight'])
    # the original names load the same way (the model's own checkpoint filter)
    cvt2 = timm.create_model('cvt_ir50')
    cvt2.load_trunk_state_dict(source)
    assert torch.equal(cvt2.trunk.stem[0].weight, cvt.trunk.stem[0].weight)


def test_evolve_cli_release_and_embedding_file(tmp_path, capsys):
    src = tmp_path / 'backbone_ir50_tiny.pth'
    torch.save(evolve_state_dict((1, 1, 2, 1), (16, 32, 64, 128)), src)
    assert convert.main(['evolve', str(src), '--target', 'ir50_tiny', '--out', str(tmp_path / 'rel')]) == 0
    out = capsys.readouterr().out
    sha = sha256_file(tmp_path / 'rel' / 'model.safetensors')
    assert f'sha256 {sha}' in out and 'output_layer.*' in out
    config = json.loads((tmp_path / 'rel' / 'config.json').read_text())
    assert config['architecture'] == 'ir50_tiny' and config['num_classes'] == 0
    # the registered model (6 classes) takes the head-less release and keeps its own new classifier
    model = timm.create_model('ir50_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'rel' / 'model.safetensors')))
    assert model.num_classes == 6
    assert torch.equal(model.stem[0].weight, torch.load(src)['input_layer.0.weight'])


@pytest.mark.parametrize('kind', ['insightface', 'adaface', 'missing_unit', 'ir100'])
def test_evolve_refuses_other_layouts_with_found_and_expected(kind):
    sd = evolve_state_dict((1, 1, 2, 1), (16, 32, 64, 128))
    if kind == 'insightface':
        sd = {'conv1.weight': torch.zeros(64, 3, 3, 3), 'bn1.weight': torch.zeros(64), 'prelu.weight': torch.zeros(64),
              'layer1.0.bn1.weight': torch.zeros(64), 'layer1.0.conv1.weight': torch.zeros(64, 64, 3, 3),
              'features.weight': torch.zeros(512), 'fc.weight': torch.zeros(512, 25088)}
        match = 'InsightFace.*input_layer'
    elif kind == 'adaface':
        sd['body.0.res_layer.5.weight'] = torch.zeros(16)
        match = 'res_layer modules \\[0, 1, 2, 3, 4, 5\\].*AdaFace'
    elif kind == 'missing_unit':
        sd = {k: v for k, v in sd.items() if not k.startswith('body.2.')}
        match = 'misses units 2'
    else:
        sd = evolve_state_dict((1, 2, 2, 1), (16, 32, 64, 128), embedding_head=False)
        match = 'ir50 has stages of 3/4/14/3 units; the checkpoint has 1/2/2/1'
    with pytest.raises(ConversionError, match=match):
        convert.convert_evolve(sd, 'ir50')


# --- the authors' checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize('regions,architecture', [
    (7, 'aucvt_raf_released'), (2, 'aucvt_openface_released'), (0, 'cvt_ir50_released')])
def test_authors_round_trip_matches_reference_forward(tmp_path, regions, architecture):
    path = tmp_path / 'checkpoint_best.pth'
    torch.save(authors_state_dict(regions), path)
    checkpoint = convert.load_checkpoint(path)  # weights_only, with the pickled argparse.Namespace allowed
    state_dict = convert.unwrap_state_dict(checkpoint)
    converted, report = convert.convert_authors(state_dict)
    assert report['architecture'] == architecture
    assert {k.split('.')[0] + '.' + k.split('.')[1] if k.startswith('vit.') else k.split('.')[0]
            for k in report['dropped']} == {'norm', 'vit.pools', 'vit.pos_block', 'vit.output_layer'}
    model = convert.build_converted(converted, report)

    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expr, aus = model.forward_with_aus(x)
        ref_expr, ref_aus = reference_forward(_strip(torch.load(path, weights_only=False)), x, regions=regions)
    assert expr.shape == (2, 6) and aus.shape == ref_aus.shape
    torch.testing.assert_close(expr, ref_expr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aus, ref_aus, rtol=1e-4, atol=1e-5)
    if regions == 7:
        assert model.au_names == RAF21


@pytest.mark.parametrize('regions', [7, 2])
def test_authors_full_size_key_list_maps_onto_released_models(regions):
    """Every key and shape of the authors' full-size checkpoints (tests/data, from their code) lands on our model."""
    rows = (DATA / f'authors_state_dict_{regions}regions.tsv').read_text().splitlines()
    shapes = {k: eval(s) for k, s in (r.split('\t') for r in rows)}  # noqa: S307 (tuples from our own data file)
    sd = {'module.' + k: torch.empty(s, device='meta', dtype=torch.long if k.endswith('num_batches_tracked')
                                     else torch.float32) for k, s in shapes.items()}
    converted, report = convert.convert_authors(convert.unwrap_state_dict({'model': sd}))
    arch = {7: 'aucvt_raf_released', 2: 'aucvt_openface_released'}[regions]
    assert report['architecture'] == arch
    assert report['model_args']['trunk_layers'] == (3, 4, 14)
    assert report['model_args']['num_heads'] == (16, 16)
    model = timm.create_model(arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert any(k == 'vit.output_layer.2.weight' for k in report['dropped'])


class _WithAus(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_with_aus(x)


def _reference_module():
    """benchmarks/reference_aucvt.py, the baseline of the speed comparison, imported by path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('reference_aucvt', ROOT / 'benchmarks' / 'reference_aucvt.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('regions', [7, 2])
def test_benchmark_reference_model_has_every_listed_key_and_shape(regions):
    """The speed baseline builds exactly the authors' modules (51M unused parameters included), no more, no less."""
    rows = (DATA / f'authors_state_dict_{regions}regions.tsv').read_text().splitlines()
    listed = {k: eval(s) for k, s in (r.split('\t') for r in rows)}  # noqa: S307 (tuples from our own data file)
    with torch.device('meta'):
        ref = _reference_module().ReferenceAuCvt(regions=regions)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == listed
    assert ref.vit.output_layer[2].weight.numel() == 512 * 100352


@pytest.mark.parametrize('regions,architecture', [
    (7, 'aucvt_raf_released'), (2, 'aucvt_openface_released'), (0, 'cvt_ir50_released')])
def test_benchmark_reference_model_matches_layout_forward_and_converted_model(regions, architecture):
    """Same weights, three implementations: the module, the functional layout forward, our converted model."""
    checkpoint = authors_state_dict(regions)
    sd = _strip(checkpoint)
    ref = _reference_module().ReferenceAuCvt(regions=regions, dim=64, depths=(2, 1), layers=(1, 1, 2),
                                             channels=(16, 32, 64), pos_blocks=1, squeeze_pooled=False).eval()
    ref.load_state_dict(sd)  # strict: every key of the generated checkpoint, nothing else
    model = convert.build_converted(*convert.convert_authors(convert.unwrap_state_dict(checkpoint)))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expr, aus = ref.forward_with_aus(x)
            layout_expr, layout_aus = reference_forward(sd, x, regions=regions)
            ours_expr, ours_aus = model.forward_with_aus(x)
        torch.testing.assert_close(expr, layout_expr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(aus, layout_aus, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_expr, expr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_aus, aus, rtol=1e-4, atol=1e-5)
    # the same computation counts the same FLOPs, though ours attends through scaled_dot_product_attention and
    # the reference through q @ k.T (the benchmark's "GFLOPs/img" and "% of peak" compare the two); the one
    # difference: our AU branch averages each region as a (regions x 196) @ (196 x 64) matmul, theirs by a mean
    both = [_WithAus(m) for m in (ref, model)]
    ref_flops, our_flops = (benchmark.count_flops(m, torch.randn(2, 3, 112, 112)) for m in both)
    assert ref_flops > 0 and our_flops - ref_flops == 2 * (2 * regions * 14 * 14 * 64)


def test_benchmark_reference_model_fails_at_batch_1_as_reported_unless_told_not_to():
    ref = _reference_module().ReferenceAuCvt(regions=7, dim=64, depths=(1, 1), layers=(1, 1, 1),
                                             channels=(16, 32, 64), pos_blocks=1).eval()
    with torch.no_grad():
        assert ref.forward_with_aus(torch.randn(2, 3, 112, 112))[1].shape == (2, 21)
        with pytest.raises((RuntimeError, IndexError)):
            ref.forward_with_aus(torch.randn(1, 3, 112, 112))
        ref.squeeze_pooled = False
        assert ref.forward_with_aus(torch.randn(1, 3, 112, 112))[1].shape == (1, 21)


def test_authors_wrong_au_heads_are_refused_with_shapes():
    checkpoint = authors_state_dict(7)
    sd = convert.unwrap_state_dict(checkpoint)
    sd['vit.head_AU3.weight'], sd['vit.head_AU3.bias'] = torch.zeros(9, 64), torch.zeros(9)
    converted, report = convert.convert_authors(sd)
    expected = r'au_head\.regions\.mouth\.fc\.weight: found \(9, 64\), expected \(14, 64\)'
    with pytest.raises(ConversionError, match=expected):
        convert.build_converted(converted, report)


def test_authors_refuses_other_checkpoints_and_untrusted_pickles(tmp_path):
    with pytest.raises(ConversionError, match='found top-level modules stem, transformer.*Expected modules `cnn'):
        convert.convert_authors({'stem.weight': torch.zeros(1), 'transformer.w': torch.zeros(1)})
    sd = convert.unwrap_state_dict(authors_state_dict(7))
    sd['vit.cls_token'] = torch.zeros(1, 1, 64)
    with pytest.raises(ConversionError, match='vit.cls_token'):
        convert.convert_authors(sd)
    path = tmp_path / 'pickled.pth'
    checkpoint = authors_state_dict(2)
    checkpoint['saved_at'] = datetime.datetime(2022, 7, 1)  # an object weights_only refuses
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match='--trust-pickle'):
        convert.load_checkpoint(path)
    assert convert.main(['authors', str(path), '--out', str(tmp_path / 'x')]) == 2
    assert not (tmp_path / 'x').exists()
    assert convert.main(['authors', str(path), '--trust-pickle', '--out', str(tmp_path / 'x')]) == 0


# --- releases: folder, card, push, Hub load -----------------------------------------------------------------------
def test_authors_cli_release_is_served_and_loads_through_hf_hub(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'checkpoint.pth'
    torch.save(authors_state_dict(7), path)
    manifest = tmp_path / 'manifest.json'
    entry = dict(model='aucvt_raf_released.lsd', repo_id='tests/aucvt_raf_released.lsd', license='other',
                 data_terms='research only', training_data='ABAW4 LSD + RAF-AU', datasets=['abaw4-lsd'],
                 metrics=[dict(type='f1', name='macro F1', dataset='ABAW4 LSD', split='validation', value=0.5,
                               protocol='6-class macro F1')])
    manifest.write_text(json.dumps({'entries': [entry]}))
    out = tmp_path / 'release'
    assert convert.main(['authors', str(path), '--out', str(out), '--manifest', str(manifest),
                         '--entry', 'aucvt_raf_released.lsd']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'aucvt_raf_released' and list(config['au_names']) == list(RAF21)
    assert config['pretrained_cfg']['label_names'] == list(aucvt_zoo.EXPRESSIONS)
    assert read_weight_facts(out / 'model.safetensors')['au_names'] == RAF21

    from huggingface_hub import ModelCard
    card = ModelCard((out / 'README.md').read_text())
    assert card.data.license == 'other'
    assert card.data.eval_results[0].metric_value == 0.5
    assert sha256_file(out / 'model.safetensors') in card.text and 'vit.output_layer.*' in card.text

    with LocalHub() as hub:
        use_endpoint(monkeypatch, hub.url, tmp_path / 'cache')
        hub.add_commit('tests/aucvt_raf_released.lsd', out)
        model = timm.create_model('hf-hub:tests/aucvt_raf_released.lsd', pretrained=True).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expr, aus = model.forward_with_aus(x)
        ref_expr, ref_aus = reference_forward(_strip(authors_state_dict(7)), x)
    torch.testing.assert_close(expr, ref_expr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aus, ref_aus, rtol=1e-4, atol=1e-5)


def test_push_uploads_the_folder_unchanged_without_printing_the_token(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'run' / 'checkpoint.pt'
    src.parent.mkdir()
    model = timm.create_model('aucvt_openface_tiny')
    torch.save({'arch': 'aucvt_openface_tiny', 'state_dict': model.state_dict(), 'epoch': 3}, src)
    token = 'hf_secretsecretsecret'
    with LocalHub() as hub:
        use_endpoint(monkeypatch, hub.url, tmp_path / 'cache')
        monkeypatch.setenv('HF_TOKEN', token)
        out = tmp_path / 'release'
        assert convert.main(['checkpoint', str(src), '--out', str(out), '--push', 'tests/pushed']) == 0
        printed = capsys.readouterr()
        files = hub.repos['tests/pushed'].commits[hub.repos['tests/pushed'].branches['main']]
    assert token not in printed.out + printed.err
    assert files['model.safetensors'] == (out / 'model.safetensors').read_bytes()
    assert set(files) == {'README.md', 'config.json', 'model.safetensors'}
    reloaded = timm.create_model('aucvt_openface_tiny', pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'))).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_with_aus(x)[1], reloaded.forward_with_aus(x)[1])


def test_checkpoint_without_architecture_asks_for_model(tmp_path):
    src = tmp_path / 'weights.pt'
    torch.save({'model': timm.create_model('cvt_ir50_tiny').state_dict()}, src)
    with pytest.raises(ConversionError, match='pass --model NAME'):
        convert.convert_zoo_checkpoint(src)
    sd, report = convert.convert_zoo_checkpoint(src, model_name='aucvt_raf_tiny')
    with pytest.raises(ConversionError, match='missing au_head.regions.between_brows'):
        convert.build_converted(sd, report)


def test_table_command_prints_the_manifest_table(capsys):
    assert convert.main(['table']) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == convert.weights_table()
    entries = json.loads((ROOT / 'weights' / 'manifest.json').read_text())['entries']
    assert len(printed.splitlines()) == len(entries) + 2


def test_trainer_hub_folder_converts_bitwise(tmp_path):
    from timm.models import save_for_hf
    torch.manual_seed(3)
    model = timm.create_model('aucvt_raf_tiny', num_classes=4).eval()
    save_for_hf(model, tmp_path / 'run', safe_serialization=True)  # what a training run leaves behind
    state_dict, report = convert.convert_zoo_checkpoint(tmp_path / 'run')
    assert report['architecture'] == 'aucvt_raf_tiny' and report['model_args']['num_classes'] == 4
    release = convert.save_release(convert.build_converted(state_dict, report), tmp_path / 'release')
    from safetensors.torch import load_file
    released = load_file(str(tmp_path / 'release' / 'model.safetensors'))
    assert released.keys() == model.state_dict().keys()
    assert all(torch.equal(released[k], v) for k, v in model.state_dict().items())
    assert release['sha256'] == sha256_file(tmp_path / 'release' / 'model.safetensors')


def test_release_files_are_byte_stable(tmp_path):
    """Equal tensors and facts give equal bytes (and sha256), whatever order the metadata map comes in."""
    from aucvt_zoo.convert import save_safetensors
    import safetensors.torch
    tensors = {'b.weight': torch.arange(6.).view(2, 3), 'a.bias': torch.ones(3)}
    facts = {'format': 'pt', 'aucvt_zoo.architecture': 'x', 'aucvt_zoo.au_names': 'AU1,AU2', 'z': '1'}
    paths = []
    for i, order in enumerate((list(facts), list(reversed(list(facts))))):
        paths.append(tmp_path / f'{i}.safetensors')
        save_safetensors(tensors, paths[-1], {k: facts[k] for k in order})
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = safetensors.torch.load_file(str(paths[0]))
    assert torch.equal(loaded['b.weight'], tensors['b.weight'])
    with safetensors.safe_open(str(paths[0]), 'pt') as f:
        assert f.metadata() == facts
