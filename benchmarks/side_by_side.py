"""The issue-6 table in one run: zoo models and timm baselines, fp32 eager vs the best path, batch 1 and 32.

    python benchmarks/side_by_side.py                       # CPU: bf16 (AMX) best path
    python benchmarks/side_by_side.py --device cuda         # the same table on a GPU (best path: fp16)
    python benchmarks/side_by_side.py --best bf16+channels_last+fold+compile --runs 7

Two phases, each in its own process, one after the other: 'default' runs fp32 eager as a user gets it (glibc
malloc untouched), 'tuned' runs fp32 eager and the best path after `aucvt_zoo.fast.tune_glibc_malloc()` (an
allocator setting is process-wide and cannot be undone cleanly, hence the processes). Writes
benchmarks/results/side_by_side-<device>.{json,md}; absolute numbers depend on what else the machine is doing.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
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


def _phase(args, paths, out_json):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == 'tuned' and device.type == 'cpu' and not fast.tune_glibc_malloc():
        print('tune_glibc_malloc not applicable here; the tuned phase runs with the default allocator')
    peaks = {p.precision: benchmark.matmul_peak_gflops(fast._PRECISIONS[p.precision], device) for p in paths}
    info = benchmark.machine_info(device)
    info['matmul_peak_gflops'] = {k: round(v, 1) for k, v in peaks.items()}
    results = []
    for name, size in ROWS:
        if args.models and name not in args.models:
            continue
        for bs in args.batch_size:
            for path in paths:
                try:
                    r = benchmark.benchmark_model(
                        name, path, bs, device=args.device, img_size=size, warmup=args.warmup, runs=args.runs,
                        min_run_s=args.min_run_s, peaks=peaks)
                except Exception as err:  # keep going; the row says what failed
                    r = benchmark.BenchmarkResult(
                        name, 'inference', str(device), bs, size or 0, path.name, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                        0, 0, None, None, benchmark._current_allocator(), torch.get_num_threads(),
                        error=f'{type(err).__name__}: {err}'.splitlines()[0][:200])
                results.append(dataclasses.asdict(r))
                print(json.dumps(results[-1]), flush=True)
    with open(out_json, 'w') as f:
        json.dump(dict(info, results=results), f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--best', default=None, help='the fast path (default: bf16 or fp16 + channels_last + fold)')
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--min-run-s', type=float, default=0.5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--models', nargs='+', default=None, help='a subset of the rows, by model name')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch decides)')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    p.add_argument('--phase', choices=['default', 'tuned'], default=None, help=argparse.SUPPRESS)
    p.add_argument('--phase-out', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    best = fast.FastPath.from_name(args.best or ('fp16' if device.type == 'cuda' else 'bf16') + '+channels_last+fold')
    if args.phase:
        _phase(args, [fast.FastPath()] if args.phase == 'default' else [fast.FastPath(), best], args.phase_out)
        return
    start = time.time()
    phases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ('default', 'tuned'):
            out = os.path.join(tmp, phase + '.json')
            child = [a for a in (argv if argv is not None else sys.argv[1:])]
            subprocess.run([sys.executable, os.path.abspath(__file__), *child, '--phase', phase, '--phase-out', out],
                           env=fast.allocator_env('glibc'), check=True)
            with open(out) as f:
                phases[phase] = json.load(f)
    rows = {}
    for phase in ('default', 'tuned'):
        for r in phases[phase]['results']:
            rows.setdefault((r['model'], r['batch_size']), []).append(benchmark.BenchmarkResult(**r))
    results = [r for key in rows for r in rows[key]]
    info = {k: v for k, v in phases['tuned'].items() if k != 'results'}
    info['matmul_peak_gflops_default_phase'] = phases['default']['matmul_peak_gflops']
    info['wall_s'] = round(time.time() - start)
    table = benchmark.markdown_table(results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f'side_by_side-{device.type}')
    with open(stem + '.json', 'w') as f:
        json.dump(dict(info, results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    with open(stem + '.md', 'w') as f:
        f.write(f'Measured {info["when"]} on {info.get("cpu", info.get("gpu"))}, torch {info["torch"]}, '
                f'{info["threads"]} threads; matmul peaks (GFLOP/s): {info["matmul_peak_gflops"]} (tuned phase), '
                f'{info["matmul_peak_gflops_default_phase"]} (default phase); {info["wall_s"]} s in all.\n\n'
                f'{table}\n')


if __name__ == '__main__':
    main()
