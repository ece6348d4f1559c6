"""The issue-6 table in one run: zoo models and timm baselines, fp32 eager vs the best path, batch 1 and 32.

    python benchmarks/side_by_side.py                       # CPU: bf16 (AMX) best path
    python benchmarks/side_by_side.py --device cuda         # the same table on a GPU (best path: fp16)
    python benchmarks/side_by_side.py --best bf16+channels_last+fold+compile --runs 7

Writes benchmarks/results/side_by_side-<device>.{json,md}. Every row is measured in this one process, one
after the other, so rows are comparable; absolute numbers depend on what else the machine is doing.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from aucvt_zoo import benchmark, fast

# (model, input size or None for the model's own); the models issue 6 asks for, in its order
ROWS = [
    ('aucvt_openface', None),
    ('aucvt_raf', None),
    ('cvt_ir50', None),
    ('aucvt_raf_released', None),  # the authors' released-code configuration
    ('resnet50', 112),
    ('vit_base_patch16_224', 224),
    ('efficientnet_b0', 224),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--best', default=None, help='the fast path (default: bf16 or fp16 + channels_last + fold)')
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--min-run-s', type=float, default=0.5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--models', nargs='+', default=None, help='a subset of the rows, by model name')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    best = args.best or ('fp16' if device.type == 'cuda' else 'bf16') + '+channels_last+fold'
    paths = [fast.FastPath(), fast.FastPath.from_name(best)]
    info = benchmark.machine_info(device)
    peaks = {p.precision: benchmark.matmul_peak_gflops(fast._PRECISIONS[p.precision], device) for p in paths}
    info['matmul_peak_gflops'] = {k: round(v, 1) for k, v in peaks.items()}
    print(json.dumps(info), flush=True)
    results = []
    start = time.time()
    for name, size in ROWS:
        if args.models and name not in args.models:
            continue
        for bs in args.batch_size:
            for path in paths:
                r = benchmark.benchmark_model(
                    name, path, bs, device=args.device, img_size=size, warmup=args.warmup, runs=args.runs,
                    min_run_s=args.min_run_s, peaks=peaks)
                results.append(r)
                print(json.dumps(dataclasses.asdict(r)), flush=True)
    info['wall_s'] = round(time.time() - start)
    table = benchmark.markdown_table(results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f'side_by_side-{device.type}')
    with open(stem + '.json', 'w') as f:
        json.dump(dict(info, results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    with open(stem + '.md', 'w') as f:
        f.write(f'Measured {info["when"]} on {info.get("cpu", info.get("gpu"))}, torch {info["torch"]}, '
                f'{info["threads"]} threads, allocator {info["allocator"]}, matmul peaks (GFLOP/s) '
                f'{info["matmul_peak_gflops"]}.\n\n{table}\n')
    return results


if __name__ == '__main__':
    sys.exit(main() and 0)
