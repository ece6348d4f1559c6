"""ONNX and TorchScript export: output names, dynamic batch, parity with PyTorch fp32; batch size 1 everywhere."""
import json

import pytest
import timm
import torch

import aucvt_zoo
from aucvt_zoo import export, fast
from aucvt_zoo.fast import FastPath

TOLERANCE = 1e-4
# one model per kind of output: expression + AUs, expression + empty AUs, expression only
TINY = ['aucvt_raf_tiny', 'cvt_ir50_tiny', 'ir50_tiny']
FULL = 'aucvt_openface'


def _model(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    # trained-looking BatchNorm statistics, so folding and export see more than identities
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize('name', TINY + [FULL])
def test_onnx_parity_and_dynamic_batch(tmp_path, name):
    pytest.importorskip('onnxscript')
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    model = _model(name)
    path = export.export_onnx(model, str(tmp_path / f'{name}.onnx'))
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    expected = ['expression_logits', 'au_logits'] if name.startswith(('cvt', 'aucvt')) else ['expression_logits']
    assert names == expected
    assert session.get_inputs()[0].name == 'input'
    for bs in (1, 3):
        x = torch.randn(bs, 3, 112, 112)
        outs = session.run(names, {'input': x.numpy()})
        with torch.no_grad():
            refs = export.ExportHeads(model)(x)
        for out, ref in zip(outs, refs):
            assert out.shape == tuple(ref.shape)
            assert (torch.from_numpy(out) - ref).abs().max().item() <= TOLERANCE if ref.numel() else True
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta['au_names']) == list(getattr(model, 'au_names', ()))
    assert json.loads(meta['label_names']) == list(aucvt_zoo.EXPRESSIONS)


@pytest.mark.parametrize('name', TINY + [FULL])
def test_torchscript_parity(tmp_path, name):
    model = _model(name)
    path = export.export_torchscript(model, str(tmp_path / f'{name}.pt'))
    diffs = export.verify_torchscript(model, path, batch_sizes=(1, 3))
    assert set(diffs) == set(export.ExportHeads(model).output_names)
    assert max(diffs.values()) <= TOLERANCE


def test_export_cli_with_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file
    model = _model('aucvt_openface_tiny')
    ckpt = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(ckpt))
    out = tmp_path / 'm.pt'
    diffs = export.main(['--model', 'aucvt_openface_tiny', '--checkpoint', str(ckpt), '--format', 'torchscript',
                         '--output', str(out)])
    assert max(diffs.values()) <= TOLERANCE
    # the written file carries the checkpoint's weights, not a fresh initialisation
    loaded = torch.jit.load(str(out))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x), atol=TOLERANCE, rtol=0)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['output'] == str(out)
    with pytest.raises(SystemExit, match='no such file'):
        export.main(['--model', 'aucvt_openface_tiny', '--checkpoint', str(tmp_path / 'nope.pth'),
                     '--format', 'onnx'])


@pytest.mark.parametrize('name', aucvt_zoo.MODEL_NAMES)
def test_batch_size_one_every_model(name):
    model = _model(name)
    x = torch.randn(1, 3, 112, 112)
    fm = fast.prepare(model, FastPath('fp32', channels_last=True, fold=True))
    expr, aus = fm.forward_with_aus(x)
    with torch.no_grad():
        ref = model(x)
    assert expr.shape == ref.shape == (1, 6)
    assert aus.shape == (1, len(getattr(model, 'au_names', ())))
    torch.testing.assert_close(expr, ref, atol=1e-4, rtol=1e-4)
