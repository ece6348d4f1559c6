"""Write a split of the built-in FACS faces to disk in the formats of the real datasets the zoo reads.

So a demo exercises the same readers as real data:
- `lsd/<EXPRESSION>/<index>.png`: LSD's folder-per-class layout, with its upper-case folder names and its own
  spelling `ANGRER` for anger.
- `openface.csv`: OpenFace-style pseudo-AU labels in the zoo's label-CSV format, `image,expression,AU1,AU2,...`
  with 0/1 presence (aucvt_zoo.data.faces.AU_PRESENCE_THRESHOLD) and image paths relative to the CSV's folder.
  It lists the images of `lsd/`, as the paper's LSD-OpenFace setting labels the LSD images (they are written
  even when `lsd` is not among the formats).
- `openface_raw/<EXPRESSION>/<index>.csv`: what OpenFace 2.x FaceLandmarkImg would write per image (one face,
  confidence 1, `AUxx_r` = 5 x intensity, `AUxx_c` = presence), so `aucvt_zoo.data.openface` can turn them into
  the label CSV as it does for real OpenFace output. The faces' labels stand in for OpenFace's: no detector runs.
- `rafau/RAFAU_label.txt` with `rafau/aligned/<nnnn>_aligned.jpg`: RAF-AU's label file (`0001.jpg 1+2+25` or
  `null`, AUs of rafau21) and its aligned-image folder. RAF-AU carries AUs only, no expression.
- `README.txt`: what the folder is (rendered cartoons, not LSD or RAF-AU) and how it was made.

    python -m aucvt_zoo.data.faces_export /tmp/facs_val --length 600 --style real --seed 1
"""
import argparse
import csv
import os
from typing import Dict, List, Optional, Sequence, Union

from ..labels import EXPRESSIONS, resolve_aus
from .faces import AU_PRESENCE_THRESHOLD, PROTOTYPE_SOURCE, RENDERED_AUS, FacsFaces, au_presence

__all__ = ['FORMATS', 'LSD_FOLDERS', 'export_split', 'main']

FORMATS = ('lsd', 'openface', 'rafau', 'openface_raw')

# LSD's folder names (ABAW4 release): upper case, with anger spelled ANGRER.
LSD_FOLDERS: Dict[str, str] = {
    'anger': 'ANGRER', 'disgust': 'DISGUST', 'fear': 'FEAR', 'happiness': 'HAPPINESS', 'sadness': 'SADNESS',
    'surprise': 'SURPRISE',
}


# The AU columns of OpenFace 2.x, in its order: intensities (AUxx_r) lack AU28, presence (AUxx_c) has it.
_OPENFACE_R = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)
_OPENFACE_C = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 28, 45)


def _write_openface_csv(path: str, intensities: Dict[str, float]) -> None:
    """One face as OpenFace 2.0's FaceLandmarkImg writes it (", "-separated header), AU columns only."""
    header = ['face', 'confidence'] + [f'AU{n:02d}_r' for n in _OPENFACE_R] + [f'AU{n:02d}_c' for n in _OPENFACE_C]
    value = [intensities.get(f'AU{n}', 0.0) for n in _OPENFACE_R]
    present = [int(au_presence(intensities.get(f'AU{n}', 0.0))) for n in _OPENFACE_C]
    row = ['0', '1.00'] + [f'{5.0 * v:.2f}' for v in value] + [f'{p:.2f}' for p in present]
    with open(path, 'w') as f:
        f.write(', '.join(header) + '\n' + ', '.join(row) + '\n')


def export_split(
        out_dir: str,
        length: int,
        style: str = 'synthetic',
        seed: int = 0,
        formats: Sequence[str] = ('lsd', 'openface', 'rafau'),
        au_names: Union[str, Sequence[Union[str, int]]] = 'openface16',
        size: int = 112,
        label_noise: float = 0.0,
) -> Dict[str, str]:
    """Render `length` faces of FacsFaces(length, style, size=size, seed=seed, label_noise=label_noise) to disk.

    Sample i is the same face in every format and as `FacsFaces(...)[i]`. Existing files are overwritten;
    nothing else in `out_dir` is touched.

    Args:
        out_dir: folder to write to (created).
        formats: any of FORMATS: 'lsd', 'openface', 'rafau', 'openface_raw'.
        au_names: AU columns of the OpenFace-style CSV (the RAF-AU file always uses rafau21's AUs).

    Returns:
        format -> the path a reader opens: the LSD root folder, the CSV file, the RAF-AU label file.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f'Unknown export format(s) {unknown or list(formats)}; choose from {", ".join(FORMATS)}.')
    dataset = FacsFaces(length, style=style, au_names=au_names, size=size, seed=seed, label_noise=label_noise)
    csv_aus = dataset.au_names
    os.makedirs(out_dir, exist_ok=True)
    written: Dict[str, str] = {}
    write_lsd = 'lsd' in formats or 'openface' in formats or 'openface_raw' in formats
    lsd_root = os.path.join(out_dir, 'lsd')
    if write_lsd:
        for folder in LSD_FOLDERS.values():
            os.makedirs(os.path.join(lsd_root, folder), exist_ok=True)
    raw_root = os.path.join(out_dir, 'openface_raw')
    if 'openface_raw' in formats:
        for folder in LSD_FOLDERS.values():
            os.makedirs(os.path.join(raw_root, folder), exist_ok=True)
    rafau_root = os.path.join(out_dir, 'rafau')
    if 'rafau' in formats:
        os.makedirs(os.path.join(rafau_root, 'aligned'), exist_ok=True)
    digits = max(6, len(str(max(length - 1, 0))))
    rafau_digits = max(4, len(str(length)))
    csv_rows: List[List[object]] = []
    rafau_lines: List[str] = []
    for i in range(length):
        labels = dataset.labels(i)
        image, _ = dataset.render(i)
        expression = EXPRESSIONS[labels.label]
        if write_lsd:
            relative = f'{LSD_FOLDERS[expression]}/{i:0{digits}d}.png'
            image.save(os.path.join(lsd_root, relative))
            csv_rows.append([f'lsd/{relative}', expression] + [int(v) for v in labels.targets(csv_aus)])
        if 'openface_raw' in formats:
            _write_openface_csv(os.path.join(raw_root, f'{LSD_FOLDERS[expression]}/{i:0{digits}d}.csv'),
                                labels.intensities)
        if 'rafau' in formats:
            stem = f'{i + 1:0{rafau_digits}d}'
            image.save(os.path.join(rafau_root, 'aligned', f'{stem}_aligned.jpg'), quality=95)
            present = labels.present()
            rafau_lines.append(f'{stem}.jpg ' + ('+'.join(au[2:] for au in present) if present else 'null'))
    if 'lsd' in formats:
        written['lsd'] = lsd_root
    if 'openface_raw' in formats:
        written['openface_raw'] = raw_root
    if 'openface' in formats:
        path = os.path.join(out_dir, 'openface.csv')
        with open(path, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['image', 'expression'] + list(csv_aus))
            writer.writerows(csv_rows)
        written['openface'] = path
    if 'rafau' in formats:
        path = os.path.join(rafau_root, 'RAFAU_label.txt')
        with open(path, 'w') as f:
            f.write(''.join(line + '\n' for line in rafau_lines))
        written['rafau'] = path
    with open(os.path.join(out_dir, 'README.txt'), 'w') as f:
        f.write(
            f'Procedurally rendered FACS cartoon faces made by aucvt_zoo.data.faces (NOT LSD, NOT RAF-AU, not '
            f'photographs).\nstyle={style} length={length} seed={seed} size={size} label_noise={label_noise}\n'
            f'Expressions from AU prototypes after {PROTOTYPE_SOURCE}; AU presence = intensity >= '
            f'{AU_PRESENCE_THRESHOLD}.\nFormats: {", ".join(sorted(written))} (see docs/faces.md).\n'
            f'Rendered AUs: {" ".join(RENDERED_AUS)}\n')
    return written


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    """Command line: write one split of the built-in faces."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir')
    parser.add_argument('--length', type=int, default=600)
    parser.add_argument('--style', default='synthetic', choices=('synthetic', 'real'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--formats', default=','.join(FORMATS), help=f'comma-separated subset of {",".join(FORMATS)}')
    parser.add_argument('--au-names', default='openface16', help='AU set of the CSV: openface16, rafau21 or AU1,AU12')
    parser.add_argument('--size', type=int, default=112)
    parser.add_argument('--label-noise', type=float, default=0.0)
    args = parser.parse_args(argv)
    au_names = args.au_names if args.au_names in ('openface16', 'rafau21') else resolve_aus(args.au_names.split(','))
    written = export_split(args.out_dir, args.length, args.style, args.seed, tuple(args.formats.split(',')), au_names,
                           args.size, args.label_noise)
    for fmt, path in written.items():
        print(f'{fmt}: {path}')
    return written


if __name__ == '__main__':
    main()
