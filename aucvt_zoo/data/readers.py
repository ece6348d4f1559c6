"""Dataset readers: LSD folders (and any folder-per-expression FER set), generic label CSVs, RAF-AU, the LSD test list.

Every training/validation reader yields `(image, expression, aus)`:
- `image`: `transform(PIL RGB image)`, or a float CxHxW tensor in [0, 1] when `transform` is None;
- `expression`: index into `aucvt_zoo.labels.EXPRESSIONS`, -1 where the sample has no expression label;
- `aus`: float32 tensor of length `len(au_names)`, 1 = present, 0 = absent, NaN = not labelled (the loss masks it).

Unreadable images follow `on_error`: 'raise' stops with the file and the reason; 'skip' logs the file once (warning),
counts it in `dataset.skipped` and returns the next readable sample in index order (deterministic, never silent).
With DataLoader workers each worker process keeps its own `skipped` count; the warnings are logged either way.

Label formats are documented in docs/data.md. Sources: the ABAW4 LSD release (folders per expression, the misspelt
`ANGRER`), RAF-AU (Yan et al. 2020, `RAFAU_label.txt`), OpenFace 2.x output via `aucvt_zoo.data.openface`.
"""
import abc
import csv
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from ..labels import EXPRESSION_ALIASES, EXPRESSIONS, au_name, expression_index, resolve_aus

__all__ = [
    'IMAGE_EXTENSIONS', 'LabelFileError', 'ImageReadError', 'LsdFolder', 'LabelCsv', 'RafAu', 'LsdTestList',
    'write_predictions', 'read_predictions', 'LSD_PREDICTION_HEADER', 'load_rgb',
]

_logger = logging.getLogger(__name__)

# What PIL reads reliably and FER sets ship; anything else in a class folder (notes, .DS_Store) is ignored.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')

AuNames = Union[str, Sequence[Union[str, int]], None]

# Header of the prediction file. The ABAW challenges' expression prediction files name the classes in the header
# (index i = i-th name) and give one `image,index` line per image; see docs/data.md for the provenance.
LSD_PREDICTION_HEADER = 'image,' + ','.join(e.capitalize() for e in EXPRESSIONS)


class LabelFileError(ValueError):
    """A label file is malformed; the message names the file, the line and what to fix."""

    def __init__(self, path: str, line: Optional[int], problem: str):
        where = f'{path}, line {line}' if line is not None else path
        super().__init__(f'{where}: {problem}')
        self.path = path
        self.line = line


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def _require(path: str, what: str, is_dir: bool) -> str:
    """Raise FileNotFoundError naming `path` and what the reader expected there."""
    ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not ok:
        kind = 'folder' if is_dir else 'file'
        raise FileNotFoundError(f'{path!r}: no such {kind}; expected {what} there.')
    return path


def _is_image(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str) -> Image.Image:
    """Open an image as PIL RGB, fully decoded (so truncated files fail here, not inside a transform)."""
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except FileNotFoundError:
        raise ImageReadError(f'{path}: image file not found.') from None
    # PIL reports broken files as OSError (truncated data), ValueError or SyntaxError (bad headers in some plugins).
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f'{path}: cannot read image ({type(e).__name__}: {e}).') from e


class _ImageDataset(Dataset, abc.ABC):
    """Shared image loading, transform and `on_error` policy. Subclasses fill `samples` and implement `_target`."""

    def __init__(self, transform: Optional[Callable], on_error: str):
        if on_error not in ('raise', 'skip'):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        self.transform = transform
        self.on_error = on_error
        self.skipped = 0
        self._bad: set = set()
        self.samples: List[Tuple[str, int]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def missing_files(self) -> List[str]:
        """Image paths that do not exist (a stat per sample): check before a long run instead of failing in it."""
        return [p for p, _ in self.samples if not os.path.isfile(p)]

    def _image(self, index: int):
        image = load_rgb(self.samples[index][0])
        return self.transform(image) if self.transform is not None else TF.to_tensor(image)

    @abc.abstractmethod
    def _target(self, index: int):
        """(expression index or -1, AU tensor) of sample `index`."""

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f'index {index} out of range for a dataset of {n} samples.')
        # Walk forward from the asked index so a bad file is always replaced by the same good one.
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                image = self._image(i)
            except ImageReadError as e:
                if self.on_error == 'raise':
                    raise ImageReadError(f"{e} Fix or remove the file, or pass on_error='skip'.") from e
                self._bad.add(i)
                self.skipped += 1
                _logger.warning('%s: skipping unreadable image (%d skipped so far): %s',
                                type(self).__name__, self.skipped, e)
                continue
            return (image,) + tuple(self._target(i))
        raise ImageReadError(f'{type(self).__name__}: none of the {n} images could be read; see the warnings above.')


def _nan_aus(count: int) -> torch.Tensor:
    return torch.full((count,), float('nan'), dtype=torch.float32)


class LsdFolder(_ImageDataset):
    """A folder per expression (LSD train/validation, or any FER set with the 6 expression folders).

    Folder names are matched case-insensitively with `aucvt_zoo.labels.expression_index` (so LSD's `ANGRER` is
    anger). Images are found recursively inside each expression folder, in sorted order. Items carry no AU labels:
    `aus` is all NaN (length `len(au_names)`), so a joint model trains only its expression head on them.

    Args:
        root: folder holding one sub-folder per expression.
        au_names: AU label set name ('rafau21', 'openface16') or AU list, for the length of `aus`; None = no AUs.
        transform: applied to the PIL RGB image; None gives a [0, 1] float tensor.
        on_error: 'raise' or 'skip' for unreadable images (see module docstring).
    """

    def __init__(self, root: str, au_names: AuNames = None, transform: Optional[Callable] = None,
                 on_error: str = 'raise'):
        super().__init__(transform, on_error)
        self.root = _require(root, 'one sub-folder per expression (e.g. ANGER, DISGUST, ... as LSD ships them)', True)
        self.au_names = resolve_aus(au_names)
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
        if not folders:
            raise FileNotFoundError(f'{root!r} has no sub-folders; expected one folder of images per expression '
                                    f'({", ".join(EXPRESSIONS)}).')
        mapping = {}
        for folder in folders:
            try:
                mapping[folder] = expression_index(folder)
            except ValueError:
                raise ValueError(
                    f'{root!r}: folder {folder!r} is not an expression. Folders found: {", ".join(folders)}. '
                    f'Accepted names (any case): {", ".join(EXPRESSIONS)} and aliases '
                    f'{", ".join(sorted(a for a in EXPRESSION_ALIASES if a not in EXPRESSIONS))}. '
                    f'Rename or move that folder.') from None
        # Expression order, so samples (and skip replacements) do not depend on how the folders are capitalised.
        for folder, expr in sorted(mapping.items(), key=lambda t: (t[1], t[0])):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
                self.samples.extend((os.path.join(dirpath, f), expr) for f in sorted(filenames) if _is_image(f))
        if not self.samples:
            raise FileNotFoundError(f'{root!r}: the expression folders {", ".join(folders)} contain no images '
                                    f'({", ".join(IMAGE_EXTENSIONS)}).')
        missing = [EXPRESSIONS[i] for i in range(len(EXPRESSIONS)) if i not in set(mapping.values())]
        if missing:
            _logger.warning('%s: no folder for expression(s) %s.', root, ', '.join(missing))
        self.class_counts = [sum(1 for _, e in self.samples if e == i) for i in range(len(EXPRESSIONS))]

    def _target(self, index: int):
        return self.samples[index][1], _nan_aus(len(self.au_names))


def _parse_expression(text: str, path: str, line: int) -> int:
    text = text.strip()
    if text == '' or text == '-1':
        return -1
    if text.lstrip('-').isdigit():
        value = int(text)
        if not 0 <= value < len(EXPRESSIONS):
            raise LabelFileError(path, line, f'expression index {value} is outside 0..{len(EXPRESSIONS) - 1} '
                                             f'({", ".join(EXPRESSIONS)}); use -1 or leave empty for unlabelled.')
        return value
    try:
        return expression_index(text)
    except ValueError as e:
        raise LabelFileError(path, line, str(e)) from None


def _parse_au_value(text: str, path: str, line: int, column: str) -> float:
    text = text.strip()
    if text == '' or text.lower() == 'nan':
        return float('nan')
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise LabelFileError(path, line, f'column {column!r} has {text!r}; AU labels are 1 (present), '
                                         f'0 (absent) or empty (not labelled).')
    return value


class LabelCsv(_ImageDataset):
    """A generic label CSV, so any dataset can be used: `image[,expression][,AU1,AU2,...]`.

    The header names the columns (case-insensitive, surrounding spaces ignored). `image` is a path relative to
    `root` (default: the CSV's folder) or absolute. `expression` is a name or alias (`happiness`, `ANGRER`) or an
    index 0-5; empty or -1 = unlabelled. AU columns are named `AU1`, `AU12`, ... with 1/0, empty = not labelled.
    AUs of `au_names` without a column are NaN for every row; AU columns outside `au_names` are dropped (logged).
    Other columns are ignored (logged). `aucvt_zoo.data.openface` writes this format.

    Args:
        csv_path: the label CSV.
        root: folder the image paths are relative to; default the CSV's folder.
        au_names: AU label set name or AU list giving the order of `aus`; None = no AUs (length 0).
        transform: applied to the PIL RGB image; None gives a [0, 1] float tensor.
        on_error: 'raise' or 'skip' for unreadable images.
    """

    def __init__(self, csv_path: str, root: Optional[str] = None, au_names: AuNames = None,
                 transform: Optional[Callable] = None, on_error: str = 'raise'):
        super().__init__(transform, on_error)
        self.csv_path = _require(csv_path, 'a label CSV with a header line (image[,expression][,AU1,...])', False)
        self.root = _require(root, 'the images the label CSV refers to', True) if root is not None else \
            os.path.dirname(os.path.abspath(csv_path))
        self.au_names = resolve_aus(au_names)
        rows: List[Tuple[str, int, List[float]]] = []
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise LabelFileError(csv_path, 1, 'the file is empty; expected a header line such as '
                                                  '"image,expression,AU1,AU2".')
            header = [h.strip() for h in header]
            keys = [h.lower() for h in header]
            duplicates = sorted({h for h in keys if keys.count(h) > 1 and h})
            if duplicates:
                raise LabelFileError(csv_path, 1, f'duplicate column(s) {", ".join(duplicates)} in the header.')
            if 'image' not in keys:
                raise LabelFileError(csv_path, 1, f'no "image" column in the header {header}; the first line must '
                                                  f'name the columns, e.g. "image,expression,AU1,AU12".')
            image_col = keys.index('image')
            expr_col = keys.index('expression') if 'expression' in keys else None
            au_cols = {}
            ignored = []
            for i, h in enumerate(header):
                if i in (image_col, expr_col):
                    continue
                if h.upper().startswith('AU') and h[2:].strip().isdigit():
                    au_cols[au_name(h)] = i
                else:
                    ignored.append(h)
            dropped = sorted((a for a in au_cols if a not in self.au_names), key=lambda a: int(a[2:]))
            if dropped:
                _logger.info('%s: %d AU column(s) not in the label set dropped: %s', csv_path, len(dropped),
                             ', '.join(dropped))
            if ignored:
                _logger.info('%s: ignoring non-label column(s): %s', csv_path, ', '.join(ignored))
            self.missing_aus = tuple(a for a in self.au_names if a not in au_cols)
            if self.au_names and self.missing_aus:
                _logger.info('%s: no column for %s; those AUs are unlabelled (NaN).', csv_path,
                             ', '.join(self.missing_aus))
            wanted = [(j, au_cols.get(a)) for j, a in enumerate(self.au_names)]
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise LabelFileError(csv_path, line, f'{len(row)} field(s) but the header has {len(header)} '
                                                         f'({",".join(header)}).')
                image = row[image_col].strip()
                if not image:
                    raise LabelFileError(csv_path, line, 'empty "image" field.')
                expr = _parse_expression(row[expr_col], csv_path, line) if expr_col is not None else -1
                aus = [float('nan')] * len(self.au_names)
                for j, col in wanted:
                    if col is not None:
                        aus[j] = _parse_au_value(row[col], csv_path, line, header[col])
                # AU columns outside the label set are still validated: a typo there is a broken file too.
                for a, col in au_cols.items():
                    if a not in self.au_names:
                        _parse_au_value(row[col], csv_path, line, header[col])
                rows.append((os.path.join(self.root, image), expr, aus))
        if not rows:
            raise LabelFileError(csv_path, None, 'no data rows after the header.')
        self.samples = [(p, e) for p, e, _ in rows]
        self.au_targets = torch.tensor([a for _, _, a in rows], dtype=torch.float32).reshape(len(rows),
                                                                                               len(self.au_names))

    def _target(self, index: int):
        return self.samples[index][1], self.au_targets[index].clone()


class RafAu(_ImageDataset):
    """RAF-AU: `RAFAU_label.txt` (`0001.jpg 1+2+L12+R4`, or `0001.jpg null`) and `aligned/0001_aligned.jpg` images.

    A side prefix (L/R: the AU on one side of the face only) counts as the AU being present. `null` means the coders
    found no AU: by default every AU of the set is then 0 (absent), not unlabelled; `null='drop'` leaves those
    images out instead (some AU papers train only on images with at least one AU). AUs outside `au_names` are
    dropped and counted in the log (`dropped_aus`). Expressions are not read from this file: `expression` is -1.

    Args:
        root: the RAF-AU folder.
        au_names: AU label set (default 'rafau21', the 21 AUs the paper keeps) or AU list.
        transform: applied to the PIL RGB image; None gives a [0, 1] float tensor.
        on_error: 'raise' or 'skip' for unreadable images.
        label_file: label file, relative to root.
        image_dir: image folder, relative to root; `<stem>.jpg` in the label file is `<stem>_aligned.jpg` there.
        null: 'absent' (a `null` line is an image with every AU 0) or 'drop' (leave `null` images out).
    """

    def __init__(self, root: str, au_names: AuNames = 'rafau21', transform: Optional[Callable] = None,
                 on_error: str = 'raise', label_file: str = 'RAFAU_label.txt', image_dir: str = 'aligned',
                 null: str = 'absent'):
        super().__init__(transform, on_error)
        if null not in ('absent', 'drop'):
            raise ValueError(f"null must be 'absent' or 'drop', got {null!r}.")
        self.root = _require(root, 'the RAF-AU release (RAFAU_label.txt and aligned/)', True)
        self.au_names = resolve_aus(au_names)
        path = _require(os.path.join(root, label_file), 'the RAF-AU label list ("0001.jpg 1+2+L12" per line)', False)
        self.label_path = path
        image_root = os.path.join(root, image_dir)
        position = {a: i for i, a in enumerate(self.au_names)}
        self.dropped_aus = {}
        self.null_count = 0
        rows = []
        with open(path, encoding='utf-8-sig') as f:
            for line, text in enumerate(f, 1):
                fields = text.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise LabelFileError(path, line, f'expected "<image> <AUs>" (e.g. "0001.jpg 1+2+L12" or '
                                                     f'"0001.jpg null"), got {text.strip()!r}.')
                name, code = fields
                stem, ext = os.path.splitext(name)
                if not ext:
                    raise LabelFileError(path, line, f'image name {name!r} has no extension (e.g. 0001.jpg).')
                aus = [0.0] * len(self.au_names)
                if code.lower() == 'null':
                    self.null_count += 1
                    if null == 'drop':
                        continue
                else:
                    for token in code.split('+'):
                        au = self._parse_token(token, path, line)
                        if au in position:
                            aus[position[au]] = 1.0
                        else:
                            self.dropped_aus[au] = self.dropped_aus.get(au, 0) + 1
                rows.append((os.path.join(image_root, f'{stem}_aligned{ext}'), aus))
        if not rows:
            raise LabelFileError(path, None, 'no labelled images in the file.')
        if self.dropped_aus:
            ordered = sorted(self.dropped_aus.items(), key=lambda t: int(t[0][2:]))
            _logger.info('%s: dropped %d label(s) of AUs outside the label set: %s', path,
                         sum(self.dropped_aus.values()), ', '.join(f'{a} x{n}' for a, n in ordered))
        self.samples = [(p, -1) for p, _ in rows]
        self.au_targets = torch.tensor([a for _, a in rows], dtype=torch.float32).reshape(len(rows),
                                                                                           len(self.au_names))

    @staticmethod
    def _parse_token(token: str, path: str, line: int) -> str:
        token = token.strip()
        body = token[1:] if token[:1].upper() in ('L', 'R') else token
        if not body.isdigit():
            raise LabelFileError(path, line, f'AU token {token!r} is not an AU number with an optional L/R side '
                                             f'prefix (e.g. 12, L12, R4); AU lists are joined with "+".')
        return f'AU{int(body)}'

    def _target(self, index: int):
        return -1, self.au_targets[index].clone()


class LsdTestList(_ImageDataset):
    """The LSD test set: a flat folder of images plus a text list of names, whose first line is a header.

    Items are `(image, name)`; write the predictions with `write_predictions`. Every listed image must be readable:
    a submission needs a prediction per image, so there is no 'skip' here. A list line may carry more
    comma-separated fields; the first one is the image name.

    Args:
        root: folder with the test images.
        list_file: the list; relative paths are tried as given, then relative to root.
        transform: applied to the PIL RGB image; None gives a [0, 1] float tensor.
    """

    def __init__(self, root: str, list_file: str, transform: Optional[Callable] = None):
        super().__init__(transform, 'raise')
        self.root = _require(root, 'the LSD test images (one flat folder)', True)
        if not os.path.isfile(list_file) and not os.path.isabs(list_file) and \
                os.path.isfile(os.path.join(root, list_file)):
            list_file = os.path.join(root, list_file)
        self.list_file = _require(list_file, 'the LSD test list (a header line, then one image name per line)', False)
        names = []
        seen = {}
        with open(list_file, encoding='utf-8-sig') as f:
            header = f.readline()
            if not header.strip():
                raise LabelFileError(list_file, 1, 'expected a header line, then one image name per line.')
            for line, text in enumerate(f, 2):
                name = text.split(',')[0].strip()
                if not name:
                    continue
                if name in seen:
                    raise LabelFileError(list_file, line, f'{name!r} is listed twice (first on line {seen[name]}).')
                seen[name] = line
                names.append(name)
        if not names:
            raise LabelFileError(list_file, None, 'no image names after the header line.')
        self.names = names
        self.samples = [(os.path.join(root, n), -1) for n in names]

    def _target(self, index: int):
        return (self.names[index],)


def write_predictions(path: str, names: Sequence[str], predictions) -> None:
    """Write an LSD submission file: header `image,Anger,...,Surprise`, then `name,index` per image in list order.

    Args:
        path: file to write (parent folders are created).
        names: image names, as `LsdTestList.names` gives them.
        predictions: expression indices (N,), or scores/logits (N, 6) of which the argmax is taken.
    """
    pred = np.asarray(predictions.detach().cpu() if isinstance(predictions, torch.Tensor) else predictions)
    if pred.ndim == 2:
        if pred.shape[1] != len(EXPRESSIONS):
            raise ValueError(f'predictions have {pred.shape[1]} scores per image; expected {len(EXPRESSIONS)} '
                             f'({", ".join(EXPRESSIONS)}).')
        pred = pred.argmax(axis=1)
    if pred.ndim != 1 or len(pred) != len(names):
        raise ValueError(f'{len(names)} names but predictions of shape {tuple(np.shape(predictions))}; '
                         f'give one index or one row of {len(EXPRESSIONS)} scores per name.')
    if len(pred) and (not np.issubdtype(pred.dtype, np.integer) or pred.min() < 0 or pred.max() >= len(EXPRESSIONS)):
        raise ValueError(f'predicted indices must be integers in 0..{len(EXPRESSIONS) - 1}.')
    for n in names:
        if ',' in n or '\n' in n:
            raise ValueError(f'image name {n!r} contains a comma or newline and cannot be written to the CSV.')
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, 'w', newline='') as f:
        f.write(LSD_PREDICTION_HEADER + '\n')
        for n, p in zip(names, pred):
            f.write(f'{n},{int(p)}\n')


def read_predictions(path: str) -> Tuple[List[str], List[int]]:
    """Read a file written by `write_predictions` (names, indices), checking its header and every line."""
    _require(path, 'a predictions file written by write_predictions', False)
    names, preds = [], []
    with open(path, encoding='utf-8-sig') as f:
        header = f.readline().strip()
        if header != LSD_PREDICTION_HEADER:
            raise LabelFileError(path, 1, f'header {header!r} is not {LSD_PREDICTION_HEADER!r}.')
        for line, text in enumerate(f, 2):
            if not text.strip():
                continue
            fields = text.strip().split(',')
            if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(EXPRESSIONS):
                raise LabelFileError(path, line, f'expected "name,index" with index 0..{len(EXPRESSIONS) - 1}, '
                                                 f'got {text.strip()!r}.')
            names.append(fields[0])
            preds.append(int(fields[1]))
    return names, preds
