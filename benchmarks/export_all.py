"""Export every registered model to ONNX and TorchScript, verify both against PyTorch fp32, time onnxruntime.

    python benchmarks/export_all.py [--models aucvt_openface ...] [--batch-size 32] [--no-time]

Prints one Markdown row per model: max |diff| of each output for each format (batch sizes 1 and 3), and
onnxruntime CPU img/s (median of 5 runs) next to PyTorch fp32 eager at `--batch-size`.
"""
import argparse
import os
import statistics
import tempfile
import time

import timm
import torch

import aucvt_zoo
from aucvt_zoo import export


def _rate(fn, x, runs=5):
    fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=list(aucvt_zoo.MODEL_NAMES))
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--no-time', action='store_true')
    args = p.parse_args(argv)
    import onnxruntime as ort
    print('| model | ONNX max abs diff | TorchScript max abs diff | onnxruntime img/s | PyTorch fp32 eager img/s |')
    print('|---|---|---|---|---|')
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export.export_onnx(model, os.path.join(tmp, 'm.onnx'))
            onnx_diff = export.verify_onnx(model, onnx_path)
            ts_diff = export.verify_torchscript(model, export.export_torchscript(model, os.path.join(tmp, 'm.pt')))
            ort_rate = torch_rate = float('nan')
            if not args.no_time:
                session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
                x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
                ort_rate = _rate(lambda t: session.run(None, {'input': t.numpy()}), x)
                with torch.inference_mode():
                    torch_rate = _rate(model, x)
        fmt = lambda d: ', '.join(f'{k} {v:.1e}' for k, v in d.items())
        print(f'| {name} | {fmt(onnx_diff)} | {fmt(ts_diff)} | {ort_rate:.1f} | {torch_rate:.1f} |', flush=True)


if __name__ == '__main__':
    main()
