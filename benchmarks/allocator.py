"""The allocator effect: the same benchmark under glibc malloc, jemalloc and tcmalloc, each in its own process.

    python benchmarks/allocator.py --model aucvt_openface --batch-size 32 --path fp32 bf16+channels_last+fold

An allocator can only be chosen before a process starts, so each one gets a child process
(`aucvt_zoo.fast.allocator_env` sets LD_PRELOAD); 'glibc-tuned' is glibc with `aucvt_zoo.fast.tune_glibc_malloc`
applied in the running process (no preload needed). Reports img/s and minor page faults per batch: glibc hands
activations larger than its mmap threshold (at most 32 MiB) back to the kernel on free, and every forward pass
faults them in again, page by page.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from aucvt_zoo import fast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='aucvt_openface')
    p.add_argument('--batch-size', nargs='+', default=['32'])
    p.add_argument('--path', nargs='+', default=['fp32', 'bf16+channels_last+fold'])
    p.add_argument('--allocators', nargs='+', default=['glibc', 'glibc-tuned', 'jemalloc', 'tcmalloc'])
    p.add_argument('--runs', default='5')
    args = p.parse_args(argv)
    rows = []
    for allocator in args.allocators:
        try:
            env = fast.allocator_env('glibc' if allocator == 'glibc-tuned' else allocator)
        except ValueError as err:
            print(f'{allocator}: skipped ({err})')
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, 'r.json')
            subprocess.run([sys.executable, '-m', 'aucvt_zoo.benchmark', '--model', args.model, '--batch-size',
                            *args.batch_size, '--path', *args.path, '--runs', args.runs, '--min-run-s', '0.5',
                            '--warmup', '2', '--json', out,
                            *(['--allocator', 'glibc-tuned'] if allocator == 'glibc-tuned' else [])], env=env, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                rows += json.load(f)['results']
    print('| allocator | batch | path | img/s (median) | min-max | page faults / batch | peak RSS MB |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['allocator']} | {r['batch_size']} | {r['path']} | {r['img_per_s']} | "
              f"{r['img_per_s_min']}-{r['img_per_s_max']} | {r['page_faults_per_batch']:.0f} | {r['peak_mem_mb']:.0f} |")
    return rows


if __name__ == '__main__':
    main()
