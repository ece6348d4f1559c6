"""Rendering speed of the built-in FACS faces: images per second on one core, per style.

    python benchmarks/render_speed.py                 # 112x112, both styles, ~3 s each
    python benchmarks/render_speed.py --size 224 --seconds 10

One process, one thread. "CPU img/s" divides by the CPU time this process used (time.process_time), so it is the
per-core rate even on a busy shared machine; "wall img/s" is what this run saw. `render` is the PIL image alone,
`item` is `FacsFaces[i]` (labels + render + tensor conversion), what a DataLoader worker does per sample.
"""
import argparse
import platform
import time
from typing import List, Optional

import torch

from aucvt_zoo.data.faces import STYLES, FacsFaces


def _rate(fn, seconds: float) -> tuple:
    fn(0)  # warm caches (parameter ramps, grids) outside the timing
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        fn(n + 1)
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return n / cpu, n / wall, n


def main(argv: Optional[List[str]] = None) -> None:
    """Print a markdown table of images/s per style."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=112)
    parser.add_argument('--seconds', type=float, default=3.0, help='timing budget per style and measure')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f'# FACS faces render speed, {args.size}x{args.size}, 1 thread, {platform.processor() or platform.machine()}')
    print('| style | measure | CPU img/s | wall img/s | images |')
    print('|---|---|---|---|---|')
    for style in STYLES:
        ds = FacsFaces(10 ** 9, style=style, size=args.size, seed=0)
        for name, fn in (('render', ds.render), ('item', ds.__getitem__)):
            cpu, wall, n = _rate(fn, args.seconds)
            print(f'| {style} | {name} | {cpu:.0f} | {wall:.0f} | {n} |')


if __name__ == '__main__':
    main()
