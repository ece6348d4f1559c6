"""OpenFace 2.x pseudo AU labels -> one label CSV (`LabelCsv` format) plus a side-car JSON recording how.

The paper (section 4.3) labels LSD with OpenFace's 16 AUs (`openface16`), keeping faces OpenFace tracked with
confidence >= 0.8. Run OpenFace on each image first, e.g.

    FaceLandmarkImg -fdir LSD/train/ANGRER -out_dir openface/ANGRER -aus       (one <stem>.csv per image)
    FeatureExtraction -f LSD/train/ANGRER/0001.jpg -out_dir openface/ANGRER -aus  (also <stem>.csv, one frame)

then

    python -m aucvt_zoo.data.openface --csv-dir openface --images LSD/train --out lsd_openface.csv \
        --expressions-from-folders

Which image a CSV belongs to: OpenFace names its output `<image stem>.csv`. A CSV at `<csv-dir>/<sub>/<stem>.csv`
belongs to the image `<images>/<sub>/<stem>.<ext>`; failing that, to the only image anywhere under `--images`
whose stem is `<stem>`. Two images that fit equally (`0001.jpg` and `0001.png`) are an error, never a guess.
A CSV with several faces (rows) is one image with several faces: the most confident successful face is kept.
A FeatureExtraction CSV of a whole folder (`-fdir`: many frames in one CSV) is refused, since its frame numbers
do not name images.

Labels: rule 'presence' uses OpenFace's `AUxx_c` (0/1) columns; rule 'intensity' marks an AU present when
`AUxx_r` (0-5) >= `intensity_threshold`. Faces with `success` != 1 or `confidence` < `min_confidence` are dropped
(or, with `keep_failed`, kept with unlabelled AUs so the expression label is not lost).
"""
import argparse
import csv
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

from ..labels import AU_SETS, EXPRESSIONS, expression_index
from .readers import IMAGE_EXTENSIONS, LabelFileError

__all__ = ['OPENFACE_AUS', 'read_openface_csv', 'best_face', 'openface_to_labels', 'main']

_logger = logging.getLogger(__name__)

# The AUs written, in the label set's order: the 16 OpenFace AUs the paper uses.
OPENFACE_AUS = AU_SETS['openface16']
RULES = ('presence', 'intensity')


def _openface_column(au: str, kind: str) -> str:
    """OpenFace's column name for an AU: 'AU1', 'c' -> 'AU01_c' (two-digit numbers)."""
    return f'AU{int(au[2:]):02d}_{kind}'


def read_openface_csv(path: str) -> List[Dict[str, str]]:
    """Rows of an OpenFace 2.x CSV as dicts keyed by header names with surrounding spaces stripped.

    OpenFace 2.0 writes headers like `frame, face_id, timestamp` (a space after each comma) and later versions
    without the space; both read the same here. A header with no data rows (no face found) gives [].
    """
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LabelFileError(path, 1, 'empty file; expected an OpenFace CSV with a header line.')
        header = [h.strip() for h in header]
        rows = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise LabelFileError(path, reader.line_num, f'{len(row)} fields but the header has {len(header)}; '
                                                            f'the file is truncated or not an OpenFace CSV.')
            rows.append({h: c.strip() for h, c in zip(header, row)})
            rows[-1]['_line'] = str(reader.line_num)
    if 'confidence' not in header:
        raise LabelFileError(path, 1, f'no "confidence" column; this does not look like an OpenFace 2.x CSV '
                                      f'(header starts {", ".join(header[:5])}).')
    return rows


def _number(row: Dict[str, str], column: str, path: str) -> float:
    if column not in row:
        raise LabelFileError(path, 1, f'no {column!r} column; run OpenFace with AU output (-aus) so the CSV has '
                                      f'the AUxx_r and AUxx_c columns.')
    try:
        value = float(row[column])
    except ValueError:
        value = float('nan')
    if not math.isfinite(value):
        raise LabelFileError(path, int(row['_line']), f'{column} is {row[column]!r}, not a number.')
    return value


def best_face(rows: Sequence[Dict[str, str]], path: str) -> Optional[Dict[str, str]]:
    """The most confident face of an image's rows among those OpenFace marks as successful (None if there is none).

    Image-mode CSVs (FaceLandmarkImg: `face,confidence,...`) have no `success` column: every row is a detected face.
    Sequence-mode CSVs (FeatureExtraction: `frame,face_id,timestamp,confidence,success,...`) must hold one frame.
    Ties keep the first row (the lowest face number).
    """
    frames = {r['frame'] for r in rows if 'frame' in r}
    if len(frames) > 1:
        raise LabelFileError(path, None, f'{len(frames)} frames in one CSV: this is a sequence (FeatureExtraction '
                                         f'-fdir/-f video) output whose frame numbers do not name images. Run '
                                         f'FaceLandmarkImg -fdir <images> (one CSV per image) instead.')
    best, best_conf = None, -math.inf
    for row in rows:
        if 'success' in row and _number(row, 'success', path) != 1:
            continue
        conf = _number(row, 'confidence', path)
        if conf > best_conf:
            best, best_conf = row, conf
    return best


def _face_labels(row: Dict[str, str], path: str, rule: str, intensity_threshold: float) -> List[int]:
    labels = []
    for au in OPENFACE_AUS:
        if rule == 'presence':
            column = _openface_column(au, 'c')
            value = _number(row, column, path)
            if value not in (0.0, 1.0):
                raise LabelFileError(path, int(row['_line']), f'{column} is {row[column]!r}; OpenFace presence '
                                                              f'columns are 0 or 1.')
            labels.append(int(value))
        else:
            labels.append(int(_number(row, _openface_column(au, 'r'), path) >= intensity_threshold))
    return labels


def _walk(root: str, keep, skip_aligned: bool = False) -> List[str]:
    """Paths relative to root of the files `keep` accepts, in sorted order, skipping hidden files and folders.

    With `skip_aligned`, OpenFace's own `<stem>_aligned/` face crops are skipped: they are not dataset images.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and not (skip_aligned and
                                                                                  d.endswith('_aligned')))
        out.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                   if not f.startswith('.') and keep(f))
    return out


def _match_images(csv_keys: Sequence[str], image_paths: Sequence[str], images: str) -> Dict[str, str]:
    """Map each CSV key (relative path without .csv) to its image's relative path; unmatched keys are left out."""
    by_key: Dict[str, List[str]] = {}
    by_stem: Dict[str, List[str]] = {}
    for p in image_paths:
        key = os.path.splitext(p)[0]
        by_key.setdefault(key, []).append(p)
        by_stem.setdefault(os.path.basename(key), []).append(p)
    matched, owner = {}, {}
    for key in csv_keys:
        candidates = by_key.get(key) or by_stem.get(os.path.basename(key), [])
        if len(candidates) > 1:
            raise ValueError(f'OpenFace CSV {key}.csv fits several images under {images!r}: '
                             f'{", ".join(candidates)}. Give each image a unique name (OpenFace names its CSVs by '
                             f'image stem), or lay out --csv-dir like --images so the sub-folders tell them apart.')
        if not candidates:
            continue
        image = candidates[0]
        if image in owner:
            raise ValueError(f'OpenFace CSVs {owner[image]}.csv and {key}.csv both fit the image {image}; '
                             f'lay out --csv-dir like --images so the sub-folders tell them apart.')
        owner[image] = key
        matched[key] = image
    return matched


def openface_to_labels(csv_dir: str, out: str, images: Optional[str] = None, rule: str = 'presence',
                       intensity_threshold: float = 1.0, min_confidence: float = 0.8,
                       expressions_from_folders: bool = False, keep_failed: bool = False) -> Dict[str, object]:
    """Turn per-image OpenFace CSVs into one `LabelCsv` file (image, expression, openface16 AUs) and `<out>.json`.

    Args:
        csv_dir: folder (searched recursively) with OpenFace's `<image stem>.csv` files.
        out: label CSV to write; image paths in it are relative to its folder.
        images: folder with the images (searched recursively); default `csv_dir` (OpenFace wrote beside them).
        rule: 'presence' (AUxx_c) or 'intensity' (AUxx_r >= intensity_threshold).
        intensity_threshold: OpenFace intensity (0-5) from which an AU counts as present, for rule 'intensity'.
        min_confidence: faces below this OpenFace confidence are dropped (paper: 0.8).
        expressions_from_folders: the first folder of each image under `images` names its expression (LSD layout).
        keep_failed: write images without a usable face (failed, low confidence, no CSV) with empty AU cells instead
            of dropping them, so their expression label is still used.

    Returns:
        The summary also written to `<out>.json`: the settings, counts of what was kept and dropped, and positives
        per AU.
    """
    if rule not in RULES:
        raise ValueError(f'rule must be one of {", ".join(RULES)}; got {rule!r}.')
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f'min_confidence is an OpenFace confidence in [0, 1]; got {min_confidence}.')
    if not os.path.isdir(csv_dir):
        raise FileNotFoundError(f'{csv_dir!r}: no such folder; expected the OpenFace output (<image stem>.csv files).')
    images = csv_dir if images is None else images
    if not os.path.isdir(images):
        raise FileNotFoundError(f'{images!r}: no such folder; expected the images OpenFace was run on.')
    out_abs = os.path.abspath(out)
    csv_files = [p for p in _walk(csv_dir, lambda f: f.lower().endswith('.csv'))
                 if os.path.abspath(os.path.join(csv_dir, p)) != out_abs]
    if not csv_files:
        raise FileNotFoundError(f'{csv_dir!r} holds no .csv files; expected OpenFace output (run FaceLandmarkImg '
                                f'-fdir <images> -out_dir {csv_dir} -aus).')
    image_paths = _walk(images, lambda f: f.lower().endswith(IMAGE_EXTENSIONS),
                        skip_aligned=os.path.abspath(images) == os.path.abspath(csv_dir))
    if not image_paths:
        raise FileNotFoundError(f'{images!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
    keys = [os.path.splitext(p)[0] for p in csv_files]
    matched = _match_images(keys, image_paths, images)

    counts = dict(csv_files=len(csv_files), images=len(image_paths), csv_without_image=0, images_without_csv=0,
                  no_face=0, failed=0, low_confidence=0, multi_face=0, labelled=0, written=0)
    unmatched = [k + '.csv' for k in keys if k not in matched]
    counts['csv_without_image'] = len(unmatched)
    if unmatched:
        _logger.warning('%d OpenFace CSV(s) match no image under %s, e.g. %s', len(unmatched), images,
                        ', '.join(unmatched[:3]))
    labels_of: Dict[str, Optional[List[int]]] = {}
    for key, image in matched.items():
        path = os.path.join(csv_dir, key + '.csv')
        rows = read_openface_csv(path)
        if len(rows) > 1:
            counts['multi_face'] += 1
        face = best_face(rows, path)
        if not rows:
            counts['no_face'] += 1
        elif face is None:
            counts['failed'] += 1
        elif _number(face, 'confidence', path) < min_confidence:
            counts['low_confidence'] += 1
            face = None
        labels_of[image] = _face_labels(face, path, rule, intensity_threshold) if face is not None else None
    without_csv = [p for p in image_paths if p not in labels_of]
    counts['images_without_csv'] = len(without_csv)
    if keep_failed:
        labels_of.update({p: None for p in without_csv})

    out_dir = os.path.dirname(out_abs)
    os.makedirs(out_dir, exist_ok=True)
    positives = [0] * len(OPENFACE_AUS)
    with open(out, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(['image', 'expression'] + list(OPENFACE_AUS))
        for image in sorted(labels_of):
            aus = labels_of[image]
            if aus is None and not keep_failed:
                continue
            expression = ''
            if expressions_from_folders:
                folder = image.replace(os.sep, '/').split('/')[0]
                if folder == image.replace(os.sep, '/'):
                    raise ValueError(f'--expressions-from-folders: image {image!r} is not inside an expression '
                                     f'folder of {images!r}; expected {images}/<expression>/<image>.')
                try:
                    expression = EXPRESSIONS[expression_index(folder)]
                except ValueError as e:
                    raise ValueError(f'--expressions-from-folders: folder {folder!r} of {images!r}: {e}') from None
            if aus is not None:
                counts['labelled'] += 1
                positives = [p + a for p, a in zip(positives, aus)]
            rel = os.path.relpath(os.path.join(os.path.abspath(images), image), out_dir).replace(os.sep, '/')
            cells = [str(a) for a in aus] if aus is not None else [''] * len(OPENFACE_AUS)
            writer.writerow([rel, expression] + cells)
            counts['written'] += 1
    if counts['written'] == 0:
        _logger.warning('%s: no image had a usable OpenFace face; the label file has only its header.', out)
    summary = dict(
        tool='aucvt_zoo.data.openface', csv_dir=os.path.abspath(csv_dir), images=os.path.abspath(images),
        rule=rule, rule_columns='AUxx_c (0/1)' if rule == 'presence' else f'AUxx_r >= {intensity_threshold}',
        intensity_threshold=intensity_threshold if rule == 'intensity' else None, min_confidence=min_confidence,
        success_required=1, expressions_from_folders=expressions_from_folders, keep_failed=keep_failed,
        au_names=list(OPENFACE_AUS), counts=counts, positives=dict(zip(OPENFACE_AUS, positives)))
    with open(out + '.json', 'w') as f:
        json.dump(summary, f, indent=2)
        f.write('\n')
    _logger.info('%s: %d images written (%d with AU labels) from %d OpenFace CSVs; settings in %s.json', out,
                 counts['written'], counts['labelled'], counts['csv_files'], out)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: OpenFace per-image CSVs -> label CSV + side-car JSON."""
    parser = argparse.ArgumentParser(
        prog='python -m aucvt_zoo.data.openface',
        description='Turn OpenFace 2.x per-image CSVs into a label CSV (image, expression, 16 AU columns) for '
                    'aucvt_zoo.data.LabelCsv; the rule and thresholds are recorded in <out>.json.')
    parser.add_argument('--csv-dir', required=True, help='OpenFace output folder (<image stem>.csv files)')
    parser.add_argument('--images', default=None, help='folder of the images OpenFace read (default: --csv-dir)')
    parser.add_argument('--out', required=True, help='label CSV to write, e.g. labels.csv')
    parser.add_argument('--rule', choices=RULES, default='presence',
                        help='presence: OpenFace AUxx_c columns; intensity: AUxx_r >= --intensity-threshold')
    parser.add_argument('--intensity-threshold', type=float, default=1.0,
                        help='OpenFace intensity (0-5) from which an AU is present, for --rule intensity')
    parser.add_argument('--min-confidence', type=float, default=0.8,
                        help='drop faces OpenFace tracked with lower confidence (paper: 0.8)')
    parser.add_argument('--expressions-from-folders', action='store_true',
                        help='the first folder of each image under --images names its expression (LSD layout)')
    parser.add_argument('--keep-failed', action='store_true',
                        help='keep images without a usable face, with empty (unlabelled) AU cells')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        summary = openface_to_labels(args.csv_dir, args.out, images=args.images, rule=args.rule,
                                     intensity_threshold=args.intensity_threshold,
                                     min_confidence=args.min_confidence,
                                     expressions_from_folders=args.expressions_from_folders,
                                     keep_failed=args.keep_failed)
    except (OSError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps(summary['counts']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
