"""timm conformance of every zoo model (after timm's tests/test_models.py), plus the zoo's own interface."""
import warnings

import pytest
import safetensors.torch
import timm
import timm.optim
import torch
import torch.nn.functional as F

import aucvt_zoo
from aucvt_zoo.labels import AU_SETS, EXPRESSIONS

FULL = ('ir50', 'cvt_ir50', 'aucvt_raf', 'aucvt_openface')
TINY = ('ir50_tiny', 'cvt_ir50_tiny', 'aucvt_raf_tiny', 'aucvt_openface_tiny')
CVTS = tuple(n for n in aucvt_zoo.MODEL_NAMES if not n.startswith('ir50'))
# the models timm's single-output backward rule applies to (an auxiliary AU head is idle under it by design)
SINGLE_OUTPUT = ('ir50', 'ir50_tiny', 'cvt_ir50', 'cvt_ir50_tiny', 'cvt_ir50_released')
AU_SIZES = {'aucvt_raf': 21, 'aucvt_openface': 16}

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')


def _input(model, batch_size=1):
    return torch.randn(batch_size, *model.pretrained_cfg['input_size'])


def test_registry_lists_the_zoo():
    assert set(timm.list_models('aucvt*')) == {n for n in aucvt_zoo.MODEL_NAMES if n.startswith('aucvt')}
    assert set(timm.list_models(['ir50*', 'cvt_ir50*', 'aucvt*'])) == set(aucvt_zoo.MODEL_NAMES)
    assert set(timm.list_models('aucvt*', pretrained=True)) >= {'aucvt_raf.lsd', 'aucvt_openface.lsd'}
    for name in aucvt_zoo.MODEL_NAMES:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', aucvt_zoo.MODEL_NAMES)
def test_forward_batch_1_and_2(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for batch_size in (1, 2):
            out = model(_input(model, batch_size))
            assert out.shape == (batch_size, len(EXPRESSIONS))
            assert not torch.isnan(out).any()


@pytest.mark.parametrize('name', [n for n in CVTS if n.startswith('aucvt')])
def test_au_logits_in_label_order(name):
    model = timm.create_model(name).eval()
    expected = AU_SETS['rafau21'] if 'raf' in name else AU_SETS['openface16']
    assert model.au_names == expected
    with torch.no_grad():
        expression, aus = model.forward_with_aus(_input(model, 2))
    assert expression.shape == (2, 6) and aus.shape == (2, len(expected))
    predicted = sum(len(a) for a in model.au_head.region_aus.values())
    paired = model.au_head.layout == 'paper7'  # eye and cheek AUs are predicted on both sides, then maxed
    assert predicted > len(expected) if paired else predicted == len(expected)


def test_forward_with_aus_equals_forward():
    model = timm.create_model('aucvt_openface_tiny').eval()
    x = _input(model, 2)
    with torch.no_grad():
        assert torch.equal(model.forward_with_aus(x)[0], model(x))
    plain = timm.create_model('cvt_ir50_tiny').eval()
    with torch.no_grad():
        assert plain.forward_with_aus(x)[1].shape == (2, 0)


@pytest.mark.parametrize('name', SINGLE_OUTPUT)
def test_backward_every_parameter_gets_a_gradient(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(model, 2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert out.shape[-1] == 42


@pytest.mark.parametrize('name', [n for n in CVTS if n.startswith('aucvt')])
def test_multitask_loss_reaches_every_parameter(name):
    model = timm.create_model(name).train()
    x = _input(model, 8)  # enough faces that each side of a symmetric pair wins the maxout for some of them
    expression, aus = model.forward_with_aus(x)
    loss = F.cross_entropy(expression, torch.arange(8) % 6) + \
        F.binary_cross_entropy_with_logits(aus, torch.randint(0, 2, aus.shape).float())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize('name', FULL + TINY + ('aucvt_raf_released',))
def test_default_cfg_consistency(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    assert cfg['input_size'] == (3, 112, 112) and cfg['mean'] == cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['crop_pct'] == 1.0 and cfg['num_classes'] == 6 and tuple(cfg['label_names']) == EXPRESSIONS
    assert cfg['paper_ids'] == 'arXiv:2207.09777' or 'arXiv:2207.09777' in cfg['paper_ids']
    assert cfg['license'] and cfg['interpolation']
    assert cfg['hf_hub_id'] == f'{aucvt_zoo.HUB_NAMESPACE}/{name}.{cfg["tag"]}'
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        if name.startswith('ir50'):
            assert features.shape[1] == model.num_features
            assert tuple(features.shape[-2:]) == cfg['pool_size']
        else:  # channels-last token map
            assert features.shape[-1] == model.num_features
            assert tuple(features.shape[1:3]) == cfg['pool_size']
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        out = model(x)
        assert out.shape == (1, model.head_hidden_size) and model.get_classifier is not None
        model.reset_classifier(0, '')
        out = model(x)
        assert out.ndim == 4
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (1, 3)


def test_flatten_head_keeps_space_and_avg_head_pools():
    paper = timm.create_model('cvt_ir50')
    assert paper.head.in_features == 7 * 7 * 512 and paper.grid == (7, 7)
    released = timm.create_model('cvt_ir50_released')
    assert released.head.in_features == 512 and released.grid == (14, 14)
    assert isinstance(released.fc_norm, torch.nn.LayerNorm) and released.pos_embed.shape == (1, 14, 14, 512)
    assert released.patch_embed.kernel_size == (3, 3) and paper.patch_embed.kernel_size == (1, 1)


def test_stage_sizes_follow_design():
    model = timm.create_model('aucvt_openface').eval()
    x = _input(model)
    with torch.no_grad():
        trunk = model.trunk.forward_features(x)
        assert trunk.shape == (1, 256, 14, 14)
        tokens, tap = model._forward_tokens(x)
    assert tap.shape == (1, 14, 14, 256)  # AU branch reads the first stage's 14x14 tokens
    assert tokens.shape == (1, 7, 7, 512)  # after 2x2 patch merging
    assert model.stages[1].downsample.reduction.weight.shape == (512, 4 * 256)
    assert [len(s.blocks) for s in model.stages] == [4, 2]
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [8, 16]
    assert model.stages[0].blocks[0].mlp.fc1.out_features == 4 * 256
    assert model.stages[0].blocks[0].mlp.dwconv.groups == 1024


def test_ir50_features_only():
    model = timm.create_model('ir50', features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [2, 4, 8, 16]
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 112, 112))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    subset = timm.create_model('ir50_tiny', features_only=True, out_indices=(1, 3))
    assert subset.feature_info.channels() == [32, 128]


def test_cvt_features_only_is_refused_with_advice():
    with pytest.raises(ValueError, match='forward_with_aus'):
        timm.create_model('aucvt_raf_tiny', features_only=True)


@pytest.mark.parametrize('name', TINY + ('cvt_ir50', 'aucvt_openface_released'))
def test_torchscript(name):
    model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = _input(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        if hasattr(model, 'forward_with_aus'):
            torch.testing.assert_close(scripted.forward_with_aus(x)[1], model.forward_with_aus(x)[1])


@pytest.mark.parametrize('name', TINY + ('cvt_ir50',))
def test_fx_forward_and_backward(name):
    model = timm.create_model(name).train()
    graph = torch.fx.symbolic_trace(model)
    x = _input(model, 2)
    model.eval(), graph.eval()
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
    graph.train()
    graph(x).sum().backward()
    assert all(p.grad is not None for p in graph.parameters())


def test_fx_feature_extraction_of_the_au_tap():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = timm.create_model('aucvt_raf_tiny').eval()
    extractor = create_feature_extractor(model, return_nodes={'stages.0': 'tap', 'head': 'logits'})
    out = extractor(_input(model, 2))
    assert out['tap'].shape == (2, 14, 14, 64) and out['logits'].shape == (2, 6)


def test_device_dtype_in_chans_and_unknown_kwargs():
    model = timm.create_model('aucvt_openface_tiny', dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 112, 112, dtype=torch.float64)).dtype == torch.float64
    meta = timm.create_model('cvt_ir50', device='meta')
    assert all(p.device.type == 'meta' for p in meta.parameters())
    gray = timm.create_model('ir50_tiny', in_chans=1)
    assert gray.stem[0].in_channels == 1 and gray(torch.randn(1, 1, 112, 112)).shape == (1, 6)
    gray_cvt = timm.create_model('aucvt_raf_tiny', in_chans=1)
    assert gray_cvt(torch.randn(1, 1, 112, 112)).shape == (1, 6)
    with pytest.raises(TypeError, match='not_an_arg'):
        timm.create_model('aucvt_raf_tiny', not_an_arg=1)


def test_num_classes_and_user_au_list():
    model = timm.create_model('aucvt_raf_tiny', num_classes=3, au_labels=['AU6', 'AU12', 'AU4'])
    expression, aus = model.forward_with_aus(torch.randn(2, 3, 112, 112))
    assert expression.shape == (2, 3) and aus.shape == (2, 3)
    assert model.au_names == ('AU6', 'AU12', 'AU4')
    assert set(model.au_head.regions) == {'between_brows', 'cheek_left', 'cheek_right', 'mouth'}
    with pytest.raises(ValueError, match='AU99'):
        timm.create_model('aucvt_raf_tiny', au_labels=['AU6', 'AU99'])


def test_wrong_input_size_says_what_it_expects():
    model = timm.create_model('aucvt_openface_tiny').eval()
    with pytest.raises(AssertionError, match='expects 112x112'):
        model(torch.randn(1, 3, 96, 96))
    resized = timm.create_model('aucvt_openface_tiny', img_size=96).eval()
    assert resized(torch.randn(1, 3, 96, 96)).shape == (1, 6)


def test_pretrained_from_a_local_file(tmp_path):
    source = timm.create_model('aucvt_raf_tiny').eval()
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(source.state_dict(), path)
    loaded = timm.create_model('aucvt_raf_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(source.forward_with_aus(x)[1], loaded.forward_with_aus(x)[1])
        assert torch.equal(source(x), loaded(x))
    # a new num_classes keeps the backbone and AU branch and re-initialises the classifier (timm's behaviour)
    adapted = timm.create_model(
        'aucvt_raf_tiny', pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(adapted.au_head.regions['mouth'].fc.weight, source.au_head.regions['mouth'].fc.weight)
    assert adapted.head.out_features == 3


def test_mismatched_checkpoint_is_reported_by_key(tmp_path):
    state_dict = timm.create_model('aucvt_raf_tiny').state_dict()
    state_dict.pop('au_head.regions.nose.fc.weight')
    state_dict['unexpected.weight'] = torch.zeros(1)
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(state_dict, path)
    with pytest.raises(aucvt_zoo.PretrainedWeightsError) as info:
        timm.create_model('aucvt_raf_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert 'au_head.regions.nose.fc.weight' in str(info.value) and 'unexpected.weight' in str(info.value)
    # weights of another AU set do not fit
    openface = timm.create_model('aucvt_openface_tiny').state_dict()
    safetensors.torch.save_file(openface, path)
    with pytest.raises(aucvt_zoo.PretrainedWeightsError, match='size mismatch'):
        timm.create_model('aucvt_raf_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_unpublished_weights_name_the_repo_and_the_way_out(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(aucvt_zoo.PretrainedWeightsError) as info:
        timm.create_model('aucvt_openface', pretrained=True)
    message = str(info.value)
    assert f'{aucvt_zoo.HUB_NAMESPACE}/aucvt_openface.lsd' in message
    assert 'pretrained_cfg_overlay=dict(file=' in message and 'HF_ENDPOINT' in message


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('aucvt_openface_tiny').train()
    x = torch.randn(2, 3, 112, 112)

    def grads():
        model.zero_grad()
        expression, aus = model.forward_with_aus(x)
        (expression.sum() + aus.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.eval()  # no dropout / BN statistics drift between the two passes
    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


def test_optimizer_groups_and_no_weight_decay():
    model = timm.create_model('aucvt_raf_released')
    assert model.no_weight_decay() == {'pos_embed'}
    groups = timm.optim.create_optimizer_v2(model, 'sgd', lr=1e-4, weight_decay=5e-4).param_groups
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_decay and id(model.stages[0].blocks[0].norm1.weight) in no_decay
    assert id(model.stages[0].blocks[0].attn.qkv.weight) not in no_decay
    layer_groups = timm.models.group_parameters(model, model.group_matcher())
    assert 'trunk.stem.0.weight' in layer_groups[0]
    assert 'head.weight' in layer_groups[max(layer_groups)]  # the classifier (and fc_norm) come last
    assert any(n.startswith('au_head') for n in layer_groups[max(layer_groups) - 1])  # joins the last block


def test_torch_hub_local_load_matches_timm():
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hubconf = torch.hub._import_module('hubconf', os.path.join(repo, 'hubconf.py'))
    assert set(aucvt_zoo.MODEL_NAMES) <= set(dir(hubconf)) and 'torch' in hubconf.dependencies
    torch.manual_seed(1)
    hub_model = torch.hub.load(repo, 'aucvt_openface_tiny', source='local', num_classes=4).eval()
    torch.manual_seed(1)
    timm_model = timm.create_model('aucvt_openface_tiny', num_classes=4).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(hub_model(x), timm_model(x))
