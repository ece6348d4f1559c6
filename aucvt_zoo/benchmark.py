"""Throughput, FLOPs, memory and matmul-peak efficiency of zoo and timm models: `python -m aucvt_zoo.benchmark`.

Modelled on timm's benchmark.py. For each model x batch size x path (see `aucvt_zoo.fast.FastPath`) it runs
warm-up iterations, then several timed runs, and reports the median images/s and its spread, parameters, GFLOPs
per image (`torch.utils.flop_counter.FlopCounterMode`, one multiply-add = 2 FLOPs), achieved GFLOP/s as a
fraction of the matmul peak of the path's precision measured in the same process, peak memory (resident set on
CPU, `torch.cuda.max_memory_allocated` on CUDA), minor page faults per batch (CPU), and, for inference, the
expression argmax agreement and max |logit diff| against fp32 eager on the benchmark batch.

Examples::

    python -m aucvt_zoo.benchmark --model aucvt_openface --batch-size 1 32 --path fp32 bf16+channels_last+fold+pack
    python -m aucvt_zoo.benchmark --model aucvt_raf resnet50 --img-size 112 --mode train --path bf16+channels_last
    python -m aucvt_zoo.benchmark --model aucvt_openface --device cuda --path fp32 fp16+channels_last+compile
    python -m aucvt_zoo.benchmark --model aucvt_openface --allocator jemalloc --json out.json --csv out.csv

`--allocator jemalloc|tcmalloc` re-runs the benchmark in a child process with the allocator preloaded
(`aucvt_zoo.fast.allocator_env`): glibc malloc returns large activation buffers to the kernel after every
forward pass and page-faults them back in on the next one.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import timm

from . import fast, native
from .fast import FastPath

__all__ = ['BenchmarkResult', 'matmul_peak_gflops', 'count_flops', 'benchmark_model', 'main']

_CHILD_ENV = 'AUCVT_ZOO_BENCHMARK_CHILD'


@dataclasses.dataclass
class BenchmarkResult:
    """One row of the benchmark: a model, a mode, a batch size and a path."""
    model: str
    mode: str
    device: str
    batch_size: int
    img_size: int
    path: str
    params_m: float
    gflops_per_img: float
    img_per_s: float
    img_per_s_min: float
    img_per_s_max: float
    runs: int
    iters_per_run: int
    step_ms: float
    achieved_gflops_per_s: float
    peak_gflops_per_s: float
    pct_of_peak: float
    peak_mem_mb: float
    page_faults_per_batch: float
    compile_time_s: float
    argmax_agreement: Optional[float]
    max_abs_diff: Optional[float]
    allocator: str
    threads: int
    error: str = ''


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: Optional[int] = None, runs: int = 5) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` on `device`: the practical peak the models are compared with."""
    device = torch.device(device)
    n = n or (8192 if device.type == 'cuda' else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = math.inf
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels but not the CPU one `scaled_dot_product_attention` runs on a
# CPU (torch 2.14), so the attention of every model that calls it (the zoo's CVTs, timm's ViTs) would count as
# free on CPU while a hand-written `q @ k.T` attention (the authors' reference) counts. Same formulas as CUDA's.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(model: nn.Module, x: torch.Tensor, train: bool = False) -> float:
    """FLOPs of one forward (and, with `train`, backward) pass on `x`, as `FlopCounterMode` counts them.

    Attention through `scaled_dot_product_attention` counts 2 * 2 * B * heads * N^2 * head_dim on every device.
    """
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        if train:
            out = model(x)
            out.float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    if train:
        model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _current_allocator() -> str:
    preload = os.environ.get('LD_PRELOAD', '')
    for name in ('jemalloc', 'tcmalloc'):
        if name in preload:
            return name
    return 'glibc-tuned' if fast._glibc_tuned else 'glibc'


# ---------------------------------------------------------------------------------------------------------------
# One configuration


def _create(name: str, img_size: Optional[int], device: torch.device,
            factory: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    if factory is not None:
        return factory().to(device).eval()
    kwargs: Dict[str, Any] = {}
    # ViT-like models are built for one input size; CNNs (and IR-50) take any size. CVT models are fixed at 112.
    if img_size is not None and name.startswith(('vit_', 'deit', 'eva', 'beit')):
        kwargs['img_size'] = img_size
    return timm.create_model(name, **kwargs).to(device).eval()


def _input_size(model: nn.Module, img_size: Optional[int]) -> int:
    if img_size is not None:
        return img_size
    return int(model.pretrained_cfg['input_size'][-1])


def _time_runs(step, device: torch.device, batch_size: int, warmup: int, runs: int, min_run_s: float):
    """Warm up, choose iterations per run so one run lasts >= min_run_s, then time `runs` runs."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    per_step = max((time.perf_counter() - start) / max(warmup, 1), 1e-6)
    iters = max(1, math.ceil(min_run_s / per_step))
    rates, faults = [], []
    for _ in range(runs):
        f0 = _minor_faults()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        rates.append(batch_size * iters / (time.perf_counter() - t0))
        faults.append((_minor_faults() - f0) / iters)
    return rates, iters, statistics.median(faults)


def benchmark_model(
        name: str,
        path: FastPath,
        batch_size: int,
        mode: str = 'inference',
        device: str = 'cpu',
        img_size: Optional[int] = None,
        warmup: int = 3,
        runs: int = 5,
        min_run_s: float = 1.0,
        peaks: Optional[Dict[str, float]] = None,
        factory: Optional[Callable[[], nn.Module]] = None,
) -> BenchmarkResult:
    """Benchmark one model/path/batch size; `peaks` maps precision -> matmul GFLOP/s (measured when missing).

    `factory` builds a model that is not in timm's registry (it is then reported as `name`), e.g. the authors'
    reference model in benchmarks/reference_aucvt.py.
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    model = _create(name, img_size, dev, factory)
    size = _input_size(model, img_size)
    in_chans = int(getattr(model, 'pretrained_cfg', {}).get('input_size', (3,))[0])
    x = torch.randn(batch_size, in_chans, size, size, device=dev)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    # inference counts what is timed: both heads (expression and AUs) where the model has an AU branch
    flops_model = _create(name, img_size, dev, factory) if mode == 'train' else fast._BothHeads(model, False)
    if mode == 'train':
        flops_model.train()
    # per image, counted on two (a model that cannot run one image, like the reference, is still counted)
    flops = count_flops(flops_model, x[:2].expand(2, -1, -1, -1), train=mode == 'train') / 2
    del flops_model
    peaks = peaks if peaks is not None else {}
    if path.precision not in peaks:
        peaks[path.precision] = matmul_peak_gflops(fast._PRECISIONS[path.precision], dev)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        _reset_peak_rss()
    agreement = None
    compile_time = 0.0
    if mode == 'inference':
        prepared = fast.prepare(model, path, example=x)
        compile_time = prepared.compile_time_s
        agreement = fast.check_agreement(prepared, x, model=model)

        def step():
            prepared.forward_with_aus(x)
    elif mode == 'train':
        step, compile_time = _train_step(model, path, x)
    else:
        raise ValueError(f"mode must be 'inference' or 'train', not {mode!r}.")
    rates, iters, faults = _time_runs(step, dev, batch_size, warmup, runs, min_run_s)
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == 'cuda' else _peak_rss_mb()
    median = statistics.median(rates)
    achieved = median * flops / 1e9
    return BenchmarkResult(
        model=name, mode=mode, device=str(dev), batch_size=batch_size, img_size=size, path=path.name,
        params_m=round(params_m, 3), gflops_per_img=round(flops / 1e9, 3), img_per_s=round(median, 2),
        img_per_s_min=round(min(rates), 2), img_per_s_max=round(max(rates), 2), runs=runs, iters_per_run=iters,
        step_ms=round(1000 * batch_size / median, 2), achieved_gflops_per_s=round(achieved, 1),
        peak_gflops_per_s=round(peaks[path.precision], 1), pct_of_peak=round(100 * achieved / peaks[path.precision], 1),
        peak_mem_mb=round(peak_mem, 1), page_faults_per_batch=round(faults, 1) if dev.type == 'cpu' else 0.0,
        compile_time_s=round(compile_time, 1),
        argmax_agreement=None if agreement is None else round(agreement.argmax_agreement, 4),
        max_abs_diff=None if agreement is None else float(f'{agreement.max_abs_diff:.3g}'),
        allocator=_current_allocator(), threads=torch.get_num_threads())


def _train_step(model: nn.Module, path: FastPath, x: torch.Tensor):
    """One SGD step (cross-entropy on the expression logits) under the path's precision and memory format."""
    if path.fold or path.pack:
        raise ValueError('fold and pack are inference-only transforms (weights and BatchNorm change while training).')
    dev = x.device
    model.train()
    if path.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, model.num_classes if getattr(model, 'num_classes', 0) else 1, (x.shape[0],), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    fwd = torch.compile(model) if path.compile else model
    scaler = torch.amp.GradScaler(dev.type, enabled=path.precision == 'fp16')

    def step():
        with torch.autocast(dev.type, dtype=fast._PRECISIONS[path.precision], enabled=path.precision != 'fp32'):
            loss = F.cross_entropy(fwd(x).float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    compile_time = 0.0
    if path.compile:
        start = time.perf_counter()
        step()
        compile_time = time.perf_counter() - start
    return step, compile_time


# ---------------------------------------------------------------------------------------------------------------
# Output


_TABLE_COLUMNS = (
    ('model', 'model'), ('img_size', 'size'), ('mode', 'mode'), ('batch_size', 'batch'), ('path', 'path'),
    ('allocator', 'malloc'),
    ('img_per_s', 'img/s (median)'), ('spread', 'min-max'), ('speedup', 'vs fp32 eager'),
    ('gflops_per_img', 'GFLOPs/img'), ('achieved_gflops_per_s', 'GFLOP/s'), ('pct_of_peak', '% of peak'),
    ('peak_mem_mb', 'peak mem MB'), ('page_faults_per_batch', 'faults/batch'), ('agreement', 'argmax agr. / max|diff|'),
)


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """The results as a Markdown table, with each row's speed-up over the first fp32 eager row of its model/batch."""
    base: Dict[Any, float] = {}
    for r in results:  # the first fp32 eager row of a model/mode/batch is the baseline
        if r.path == 'fp32' and not r.error:
            base.setdefault((r.model, r.mode, r.batch_size), r.img_per_s)
    lines = ['| ' + ' | '.join(h for _, h in _TABLE_COLUMNS) + ' |', '|' + '---|' * len(_TABLE_COLUMNS)]
    for r in results:
        if r.error:
            lines.append(f'| {r.model} | {r.img_size} | {r.mode} | {r.batch_size} | {r.path} | failed: {r.error} |')
            continue
        ref = base.get((r.model, r.mode, r.batch_size))
        cells = {
            'spread': f'{r.img_per_s_min:g}-{r.img_per_s_max:g}',
            'speedup': f'{r.img_per_s / ref:.2f}x' if ref else '',
            'agreement': '' if r.argmax_agreement is None else f'{r.argmax_agreement:.3f} / {r.max_abs_diff:.2g}',
        }
        lines.append('| ' + ' | '.join(
            str(cells[k]) if k in cells else f'{getattr(r, k):g}' if isinstance(getattr(r, k), float)
            else str(getattr(r, k)) for k, _ in _TABLE_COLUMNS) + ' |')
    return '\n'.join(lines)


def _write(results: List[BenchmarkResult], json_path: Optional[str], csv_path: Optional[str], meta: Dict) -> None:
    rows = [dataclasses.asdict(r) for r in results]
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(dict(meta, results=rows), f, indent=1)
    if csv_path:
        with open(csv_path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['model'])
            writer.writeheader()
            writer.writerows(rows)


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on."""
    info: Dict[str, Any] = dict(
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(), device=str(device),
        threads=torch.get_num_threads(), allocator=_current_allocator(), when=time.strftime('%Y-%m-%d %H:%M:%S'))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        info['cpu'] = _cpu_model()
        info['cpu_capability'] = torch.backends.cpu.get_cpu_capability()
        info['bf16_native'] = fast.bf16_supported(device)
        info['amx'] = _has_cpu_flag('amx_bf16')
        info['native_prelu'] = 'yes' if native.available() else native.unavailable_reason()  # used by `pack`
    return info


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _has_cpu_flag(flag: str) -> bool:
    try:
        with open('/proc/cpuinfo') as f:
            return any(line.startswith('flags') and flag in line.split() for line in f)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m aucvt_zoo.benchmark', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', nargs='+', default=['aucvt_openface'], help='zoo or timm model names')
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--path', nargs='+', default=['fp32', 'bf16+channels_last+fold+pack'],
                   help="paths as <fp32|bf16|fp16>[+channels_last][+fold][+pack|+compile]; 'fp32' is eager fp32")
    p.add_argument('--mode', nargs='+', default=['inference'], choices=['inference', 'train'])
    p.add_argument('--img-size', type=int, default=None,
                   help="input size (default: the model's pretrained_cfg; e.g. 112 for resnet50 at face size)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=3, help='warm-up iterations before timing')
    p.add_argument('--runs', type=int, default=5, help='timed runs; the median is reported')
    p.add_argument('--min-run-s', type=float, default=1.0, help='each timed run repeats the step for >= this long')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch decides)')
    p.add_argument('--allocator', default='current', choices=['current', 'glibc', 'glibc-tuned', 'jemalloc', 'tcmalloc'],
                   help='jemalloc/tcmalloc/glibc: re-run in a child process with this malloc preloaded (glibc: '
                        'without a preload); glibc-tuned: keep glibc and apply fast.tune_glibc_malloc in-process')
    p.add_argument('--json', default=None, help='write results and machine info here')
    p.add_argument('--csv', default=None, help='write one row per result here')
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[BenchmarkResult]:
    """Run the benchmark; prints a Markdown table and returns the results."""
    args = _parser().parse_args(argv)
    if args.allocator == 'glibc-tuned' and not fast.tune_glibc_malloc():
        raise SystemExit('--allocator glibc-tuned: malloc here is not glibc (or another allocator is preloaded).')
    if args.allocator not in ('current', 'glibc-tuned') and args.allocator != _current_allocator() and \
            not os.environ.get(_CHILD_ENV):
        env = fast.allocator_env(args.allocator)
        env[_CHILD_ENV] = '1'
        child_argv = list(argv if argv is not None else sys.argv[1:])
        code = subprocess.call([sys.executable, '-m', 'aucvt_zoo.benchmark', *child_argv], env=env)
        if code:
            raise SystemExit(code)
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = [FastPath.from_name(p) for p in args.path]
    info = machine_info(device)
    peaks = {prec: matmul_peak_gflops(fast._PRECISIONS[prec], device) for prec in sorted({p.precision for p in paths})}
    info['matmul_peak_gflops'] = {k: round(v, 1) for k, v in peaks.items()}
    print(json.dumps(info), flush=True)
    results: List[BenchmarkResult] = []
    for name in args.model:
        for mode in args.mode:
            for batch_size in args.batch_size:
                for path in paths:
                    if mode == 'train' and (path.fold or path.pack):
                        continue
                    try:
                        r = benchmark_model(
                            name, path, batch_size, mode=mode, device=args.device, img_size=args.img_size,
                            warmup=args.warmup, runs=args.runs, min_run_s=args.min_run_s, peaks=peaks)
                    except Exception as err:  # keep the other rows; the failure is a row of its own
                        r = BenchmarkResult(
                            name, mode, str(device), batch_size, args.img_size or 0, path.name, 0, 0, 0, 0, 0, 0, 0,
                            0, 0, 0, 0, 0, 0, 0, None, None, _current_allocator(), torch.get_num_threads(),
                            error=f'{type(err).__name__}: {err}'.splitlines()[0][:200])
                    results.append(r)
                    print(json.dumps(dataclasses.asdict(r)), flush=True)
    print(markdown_table(results))
    _write(results, args.json, args.csv, info)
    return results


if __name__ == '__main__':
    main()
