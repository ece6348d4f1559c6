"""Export zoo models to ONNX or TorchScript, verified against PyTorch fp32: `python -m aucvt_zoo.export`.

Both formats take a (batch, 3, H, W) float input named `input` (aligned faces normalised as in
`model.pretrained_cfg`; any batch size) and return `expression_logits` (batch, classes) and, for CVT models,
`au_logits` (batch, len(model.au_names)) in the order of `model.au_names` ((batch, 0) for `cvt_ir50*`, which
have no AU branch). IR-50 models return `expression_logits` only. The expression labels and AU names are
written into the ONNX metadata (`label_names`, `au_names`) so a runtime needs nothing else.

Examples::

    python -m aucvt_zoo.export --model aucvt_openface --checkpoint aucvt_openface.safetensors --format onnx
    python -m aucvt_zoo.export --model aucvt_raf --format torchscript --output aucvt_raf.pt

After writing, the exported file is run (onnxruntime on CPU for ONNX, `torch.jit.load` for TorchScript) on
random batches of two sizes and compared with the PyTorch fp32 model; the export fails if any output differs by
more than `--tolerance` (default 1e-4). ONNX needs the optional extra: `pip install aucvt_zoo[onnx]`.
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

__all__ = ['ExportHeads', 'export_onnx', 'export_torchscript', 'verify_onnx', 'verify_torchscript', 'main']

INPUT_NAME = 'input'
EXPRESSION_OUTPUT = 'expression_logits'
AU_OUTPUT = 'au_logits'


class ExportHeads(nn.Module):
    """forward(x) -> (expression_logits, au_logits) for CVT models, (expression_logits,) for the others.

    The two cases are two small classes (`_ExpressionAndAus`, `_ExpressionOnly`) so TorchScript never sees a
    call to a method the model does not have; `ExportHeads(model)` builds the right one.
    """

    def __new__(cls, model: nn.Module) -> nn.Module:
        if hasattr(model, 'forward_with_aus'):
            return _ExpressionAndAus(model)
        return _ExpressionOnly(model)


class _ExpressionAndAus(nn.Module):
    output_names = (EXPRESSION_OUTPUT, AU_OUTPUT)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_aus(x)


class _ExpressionOnly(nn.Module):
    output_names = (EXPRESSION_OUTPUT,)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        return (self.model(x),)


def _example(model: nn.Module, batch_size: int) -> torch.Tensor:
    size = tuple(model.pretrained_cfg['input_size'])
    return torch.randn(batch_size, *size)


def _metadata(model: nn.Module) -> Dict[str, str]:
    cfg = getattr(model, 'pretrained_cfg', {})
    return {
        'model': str(cfg.get('architecture', type(model).__name__)),
        'input_size': json.dumps(list(cfg.get('input_size', ()))),
        'mean': json.dumps(list(cfg.get('mean', ()))),
        'std': json.dumps(list(cfg.get('std', ()))),
        'label_names': json.dumps(list(cfg.get('label_names', ()))),
        'au_names': json.dumps(list(getattr(model, 'au_names', ()))),
    }


def export_onnx(model: nn.Module, path: str, opset: Optional[int] = None) -> str:
    """Write `model` (eval mode, fp32, CPU) as ONNX with a dynamic batch dimension; returns `path`."""
    import onnx  # optional extra: pip install aucvt_zoo[onnx]

    heads = ExportHeads(model.float().cpu().eval())
    # Batch 2 as the example: torch.export would specialise a batch of 1 into a constant.
    example = _example(model, 2)
    batch = torch.export.Dim('batch', min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(
            heads, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(heads.output_names),
            dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, report=False, verbose=False)
    program.save(path)
    proto = onnx.load(path)
    for key, value in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    return path


def export_torchscript(model: nn.Module, path: str) -> str:
    """Write `model` as a scripted TorchScript module returning the output tuple of `ExportHeads`."""
    heads = ExportHeads(model.float().cpu().eval())
    scripted = torch.jit.script(heads)
    extra = {k + '.json' if not k.endswith('.json') else k: v for k, v in _metadata(model).items()}
    torch.jit.save(scripted, path, _extra_files=extra)
    return path


def _reference(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return [t.float() for t in ExportHeads(model.float().cpu().eval())(x)]


def _max_diffs(outs: Sequence, refs: Sequence[torch.Tensor], names: Sequence[str]) -> Dict[str, float]:
    diffs = {}
    for name, out, ref in zip(names, outs, refs):
        out = torch.as_tensor(out)
        if tuple(out.shape) != tuple(ref.shape):
            raise AssertionError(f'{name}: exported output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}.')
        diffs[name] = (out - ref).abs().max().item() if ref.numel() else 0.0
    return diffs


def verify_onnx(model: nn.Module, path: str, batch_sizes: Sequence[int] = (1, 3)) -> Dict[str, float]:
    """Max |diff| per output between onnxruntime (CPU) and PyTorch fp32, over random batches of each size."""
    import onnxruntime as ort  # optional extra: pip install aucvt_zoo[onnx]

    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    worst: Dict[str, float] = {}
    for bs in batch_sizes:
        x = _example(model, bs)
        outs = session.run(names, {session.get_inputs()[0].name: x.numpy()})
        for k, v in _max_diffs(outs, _reference(model, x), names).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


def verify_torchscript(model: nn.Module, path: str, batch_sizes: Sequence[int] = (1, 3)) -> Dict[str, float]:
    """Max |diff| per output between the saved TorchScript module and PyTorch fp32."""
    loaded = torch.jit.load(path, map_location='cpu')
    names = ExportHeads(model).output_names
    worst: Dict[str, float] = {}
    for bs in batch_sizes:
        x = _example(model, bs)
        with torch.no_grad():
            outs = loaded(x)
        for k, v in _max_diffs(outs, _reference(model, x), names).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m aucvt_zoo.export', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='registered model name, e.g. aucvt_openface')
    p.add_argument('--checkpoint', default=None, help='weights to load (.safetensors or .pth state dict)')
    p.add_argument('--pretrained', action='store_true', help="load the model's published weights from the Hub")
    p.add_argument('--format', required=True, choices=['onnx', 'torchscript'])
    p.add_argument('--output', default=None, help='file to write (default: <model>.onnx or <model>.pt)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter\'s)')
    p.add_argument('--tolerance', type=float, default=1e-4, help='max |diff| allowed against PyTorch fp32')
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Export, verify, print the max |diff| per output; exits non-zero if verification fails."""
    args = _parser().parse_args(argv)
    kwargs = {}
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise SystemExit(f'--checkpoint {args.checkpoint}: no such file.')
        kwargs['checkpoint_path'] = args.checkpoint
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    output = args.output or f'{args.model}.{"onnx" if args.format == "onnx" else "pt"}'
    if args.format == 'onnx':
        try:
            export_onnx(model, output, args.opset)
        except ImportError as err:
            raise SystemExit(f'ONNX export needs onnx, onnxscript and onnxruntime: pip install "aucvt_zoo[onnx]" '
                             f'({err}).')
        diffs = verify_onnx(model, output)
    else:
        export_torchscript(model, output)
        diffs = verify_torchscript(model, output)
    print(json.dumps(dict(model=args.model, format=args.format, output=output, max_abs_diff=diffs)))
    worst = max(diffs.values())
    if worst > args.tolerance:
        raise SystemExit(f'{output}: exported outputs differ from PyTorch fp32 by {worst:.3g} > --tolerance '
                         f'{args.tolerance:g} ({diffs}); the file was written but should not be used.')
    return diffs


if __name__ == '__main__':
    main()
