"""Picture grids of the built-in FACS faces: the 6 expressions, and single Action Units at rising intensity.

    python examples/render_grid.py                 # writes docs/img/expressions.png and docs/img/aus.png
    python examples/render_grid.py --out /tmp/img --identities 6

The faces are procedurally rendered cartoons (aucvt_zoo.data.faces), not photographs and not LSD.
"""
import argparse
import os
from dataclasses import replace
from typing import List, Optional

import numpy as np
from PIL import Image, ImageDraw

from aucvt_zoo.data.faces import PROTOTYPES, RENDERED_AUS, STYLES, render, sample_identity
from aucvt_zoo.labels import EXPRESSIONS, FACS_NAMES

_LABEL = 14  # pixels of caption text per row / column header
_INK = (20, 20, 20)


def _sheet(cells: List[List[Image.Image]], row_names: List[str], col_names: List[str], cell: int,
           row_width: int) -> Image.Image:
    """Paste cells (rows x cols of cell x cell images) under column headers, after row captions."""
    rows, cols = len(cells), len(cells[0])
    sheet = Image.new('RGB', (row_width + cols * cell, _LABEL + rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(col_names):
        draw.text((row_width + c * cell + 3, 1), name, fill=_INK)
    for r, row in enumerate(cells):
        draw.text((3, _LABEL + r * cell + cell // 2 - 6), row_names[r], fill=_INK)
        for c, image in enumerate(row):
            sheet.paste(image, (row_width + c * cell, _LABEL + r * cell))
    return sheet


def expressions_grid(identities: int = 4, size: int = 96, seed: int = 0) -> Image.Image:
    """Rows: expressions at their full prototype (intensity 0.85); columns: identities of each style."""
    people = [(style, sample_identity(np.random.default_rng([seed, s, i]), style))
              for s, style in enumerate(STYLES) for i in range(identities)]
    cells = [[render({au: 0.85 for au in PROTOTYPES[name]}, idt, style, size, seed=seed + k)[0]
              for k, (style, idt) in enumerate(people)] for name in EXPRESSIONS]
    rows = [f'{name} {"+".join(au[2:] for au in PROTOTYPES[name])}' for name in EXPRESSIONS]
    cols = [style for style, _ in people]
    return _sheet(cells, rows, cols, size, 128)


def aus_grid(levels=(0.0, 0.25, 0.5, 0.75, 1.0), size: int = 96, seed: int = 0) -> Image.Image:
    """Rows: each rendered AU alone; columns: rising intensity, on one aligned synthetic identity."""
    idt = sample_identity(np.random.default_rng([seed, 99]), 'synthetic').aligned()
    # short hair, a high hairline and full brows keep the forehead lines and brow movements easy to see
    idt = replace(idt, hair_style=0, hairline=16.0, brow_thickness=3.0, brow_color=(70, 50, 40))
    cells = [[render({au: level}, idt, 'synthetic', size)[0] for level in levels] for au in RENDERED_AUS]
    rows = [f'{au} {FACS_NAMES[au]}' for au in RENDERED_AUS]
    cols = [f'{level:.2f}' for level in levels]
    # two blocks side by side keep the picture wide rather than very tall
    split = (len(cells) + 1) // 2
    left = _sheet(cells[:split], rows[:split], cols, size, 150)
    right = _sheet(cells[split:], rows[split:], cols, size, 150)
    out = Image.new('RGB', (left.width + right.width + 10, left.height), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + 10, 0))
    return out


def main(argv: Optional[List[str]] = None) -> None:
    """Write the expression and AU grids as PNGs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument('--out', default=os.path.join(repo, 'docs', 'img'),
                        help='output folder (default: docs/img of the repository)')
    parser.add_argument('--identities', type=int, default=4, help='identities per style in the expression grid')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, image in (('expressions.png', expressions_grid(args.identities, seed=args.seed)),
                        ('aus.png', aus_grid(seed=args.seed))):
        path = os.path.join(args.out, name)
        # a 256-colour palette keeps the "real" style's noise from making the PNG several hundred KB
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        print(f'wrote {path} ({image.width}x{image.height}, {os.path.getsize(path) // 1024} KB)')


if __name__ == '__main__':
    main()
