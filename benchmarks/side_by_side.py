"""The issue-6 table in one run: zoo models and timm baselines, fp32 eager vs the best path, batch 1 and 32.

    python benchmarks/side_by_side.py                       # CPU: bf16 (AMX), packed oneDNN weights, 2 streams
    python benchmarks/side_by_side.py --device cuda         # the same table on a GPU (best path: fp16)
    python benchmarks/side_by_side.py --best bf16+channels_last+fold+compile --runs 7

Two phases: 'default' runs fp32 eager as a user gets it (glibc malloc untouched), 'tuned' runs fp32 eager and
the best path after `aucvt_zoo.fast.tune_glibc_malloc()`. Every (phase, model, path) runs in a fresh process, one
after the other (an allocator setting cannot be undone in a process, and one configuration's leftover heap
slows the next). Writes
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

from aucvt_zoo import benchmark, convert, fast

from reference_aucvt import ReferenceAuCvt  # noqa: E402  (benchmarks/ is this script's directory)

REFERENCE = 'authors_reference'  # the authors' AU-CVT (7 regions), rebuilt in benchmarks/reference_aucvt.py

# (model, input size or None for the model's own); the models issue 6 asks for, in its order
ROWS = [
    (REFERENCE, None),
    ('aucvt_openface', None),
    ('aucvt_raf', None),
    ('cvt_ir50', None),
    ('aucvt_raf_released', None),  # the authors' released-code configuration
    ('resnet50', 112),
    ('vit_base_patch16_224', 224),
    ('efficientnet_b0', 224),
]


def _reference_checks(device):
    """The released-code configuration against the reference on the same weights, and the batch-1 failure."""
    torch.manual_seed(0)
    ref = ReferenceAuCvt(regions=7).to(device).eval()
    for m in ref.modules():  # non-trivial BN statistics, so the BN handling is exercised too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    converted, report = convert.convert_authors(ref.state_dict())
    ours = convert.build_converted(converted, report).to(device).eval()
    x = torch.randn(32, 3, 112, 112, device=device)
    with torch.inference_mode():
        ref_expr, ref_aus = ref.forward_with_aus(x)
        expr, aus = ours.forward_with_aus(x)
        try:
            ref.forward_with_aus(x[:1])
            batch1 = 'runs'
        except Exception as err:  # the reported crash
            batch1 = f'{type(err).__name__}: {err}'.splitlines()[0][:160]
    return {
        'released_model': report['architecture'],
        'dropped_parameters_m': round(sum(ref.state_dict()[k].numel() for k in report['dropped']) / 1e6, 1),
        'reference_params_m': round(sum(p.numel() for p in ref.parameters()) / 1e6, 1),
        'released_params_m': round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        'max_abs_diff_expression': float(f'{(expr - ref_expr).abs().max().item():.3g}'),
        'max_abs_diff_aus': float(f'{(aus - ref_aus).abs().max().item():.3g}'),
        'argmax_agreement': (expr.argmax(1) == ref_expr.argmax(1)).float().mean().item(),
        'reference_at_batch_1': batch1,
    }


def _phase(args, paths, out_json):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == 'tuned' and device.type == 'cpu' and not fast.tune_glibc_malloc():
        print('tune_glibc_malloc not applicable here; the tuned phase runs with the default allocator')
    peaks = {p.precision: benchmark.matmul_peak_gflops(fast._PRECISIONS[p.precision], device) for p in paths}
    info = benchmark.machine_info(device)
    if args.phase == 'tuned' and (not args.models or REFERENCE in args.models) and paths[0] == fast.FastPath():
        info['reference'] = _reference_checks(device)
        print(json.dumps(info['reference']), flush=True)
    info['matmul_peak_gflops'] = {k: round(v, 1) for k, v in peaks.items()}
    results = []
    for name, size in ROWS:
        if args.models and name not in args.models:
            continue
        for bs in args.batch_size:
            for path in paths:
                factory, row_name = None, name
                if name == REFERENCE:
                    # the reference gets fp32 eager and the stock tricks (precision, channels_last), not ours
                    path = fast.FastPath(path.precision, channels_last=path.channels_last)
                    # it fails at batch 1 (pooled features squeezed); time batch 1 without the squeeze, and say so
                    factory = lambda squeeze=bs > 1: ReferenceAuCvt(regions=7, squeeze_pooled=squeeze)  # noqa: E731
                    row_name = name if bs > 1 else name + ' (no squeeze)'
                try:
                    r = benchmark.benchmark_model(
                        row_name, path, bs, device=args.device, img_size=size, warmup=args.warmup, runs=args.runs,
                        min_run_s=args.min_run_s, peaks=peaks, factory=factory)
                except Exception as err:  # keep going; the row says what failed
                    r = benchmark.BenchmarkResult(
                        name, 'inference', str(device), bs, size or 0, path.name, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                        0, 0, None, None, benchmark._current_allocator(), torch.get_num_threads(),
                        error=f'{type(err).__name__}: {err}'.splitlines()[0][:200])
                results.append(dataclasses.asdict(r))
                print(json.dumps(results[-1]), flush=True)
    with open(out_json, 'w') as f:
        json.dump(dict(info, results=results), f)


def _against_reference(results):
    """Each model's fastest row as a multiple of the reference's fp32 eager (default malloc) at the same batch."""
    base = {r.batch_size: r.img_per_s for r in results
            if r.model.startswith(REFERENCE) and r.path == 'fp32' and r.allocator == 'glibc' and not r.error}
    lines = ['| model | batch | fastest path | img/s | x reference fp32 eager | % of peak |',
             '|---|---|---|---|---|---|']
    best = {}
    for r in results:
        key = (r.model.split(' ')[0], r.batch_size)
        if not r.error and (key not in best or r.img_per_s > best[key].img_per_s):
            best[key] = r
    for (model, bs), r in best.items():
        ratio = f'{r.img_per_s / base[bs]:.2f}x' if base.get(bs) else 'n/a'
        lines.append(f'| {r.model} | {bs} | {r.path} ({r.allocator}) | {r.img_per_s} | {ratio} | {r.pct_of_peak} |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--best', default=None,
                   help='the fast path (default on CPU: bf16+channels_last+fold+pack, +streams2 with >= 2 threads; '
                        'on CUDA: fp16+channels_last+fold)')
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--min-run-s', type=float, default=0.5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--models', nargs='+', default=None, help='a subset of the rows, by model name')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch decides)')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    p.add_argument('--phase', choices=['default', 'tuned'], default=None, help=argparse.SUPPRESS)
    p.add_argument('--phase-out', default=None, help=argparse.SUPPRESS)
    p.add_argument('--only-path', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.best is None and device.type == 'cpu':  # two streams where there are two cores to give them
        threads = args.threads or torch.get_num_threads()
        args.best = 'bf16+channels_last+fold+pack' + ('+streams2' if threads >= 2 else '')
    best = fast.FastPath.from_name(args.best or 'fp16+channels_last+fold')
    if args.phase:
        _phase(args, [fast.FastPath.from_name(args.only_path)], args.phase_out)
        return
    # Every (phase, model, path) runs in a fresh process, one after the other: an allocator setting cannot be
    # undone in a process, and what one configuration leaves in the heap (the reference's, 2.4 GB) slowed the
    # next ones by 5-10% when they shared a process.
    start = time.time()
    models = [name for name, _ in ROWS if not args.models or name in args.models]
    jobs = [('default', m, 'fp32') for m in models] + [('tuned', m, p) for m in models for p in ('fp32', best.name)]
    common = ['--device', args.device, '--batch-size', *map(str, args.batch_size), '--runs', str(args.runs),
              '--min-run-s', str(args.min_run_s), '--warmup', str(args.warmup), '--best', best.name]
    common += ['--threads', str(args.threads)] if args.threads else []
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (phase, model, path) in enumerate(jobs):
            out = os.path.join(tmp, f'{i}.json')
            subprocess.run([sys.executable, os.path.abspath(__file__), *common, '--models', model, '--phase', phase,
                            '--only-path', path, '--phase-out', out], env=fast.allocator_env('glibc'), check=True)
            with open(out) as f:
                outputs.append((phase, json.load(f)))
    rows = {}
    for phase, output in outputs:
        for r in output['results']:
            rows.setdefault((r['model'], r['batch_size']), []).append(benchmark.BenchmarkResult(**r))
    results = [r for key in rows for r in rows[key]]
    info = {k: v for k, v in outputs[-1][1].items() if k not in ('results', 'matmul_peak_gflops')}
    info['reference'] = next((o['reference'] for _, o in outputs if 'reference' in o), None)
    peaks = {}
    for _, output in outputs:
        for precision, value in output['matmul_peak_gflops'].items():
            peaks.setdefault(precision, []).append(value)
    info['matmul_peak_gflops'] = {k: [min(v), max(v)] for k, v in peaks.items()}  # over the processes
    info['wall_s'] = round(time.time() - start)
    table = benchmark.markdown_table(results) + '\n\n' + _against_reference(results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f'side_by_side-{device.type}')
    with open(stem + '.json', 'w') as f:
        json.dump(dict(info, results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    with open(stem + '.md', 'w') as f:
        f.write(f'Measured {info["when"]} on {info.get("cpu", info.get("gpu"))}, torch {info["torch"]}, '
                f'{info["threads"]} threads, each configuration in a fresh process; matmul peaks (GFLOP/s, min and '
                f'max over the processes; each row uses its own): {info["matmul_peak_gflops"]}; '
                f'{info["wall_s"]} s in all.\n'
                f'Released-code configuration vs the reference on the same weights: {info.get("reference")}\n\n'
                f'{table}\n')


if __name__ == '__main__':
    main()
