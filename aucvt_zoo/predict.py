"""Expressions and named AUs for every face in images, folders and videos: `python -m aucvt_zoo.predict`.

    python -m aucvt_zoo.predict photos/ clip.mp4 --model aucvt_openface --output faces.csv
    python -m aucvt_zoo.predict crops/ --aligned --model aucvt_raf --checkpoint run/best/ --output faces.jsonl

Pipeline: decode (Pillow; PyAV or OpenCV for video, streamed frame by frame) -> detect faces and their 5 landmarks
(`aucvt_zoo.detect`, optional: `--aligned` skips it, `--landmarks` supplies points) -> warp each face onto the
model's template (`aucvt_zoo.align`: Pillow on CPU, torch `grid_sample` on an accelerator) -> the model in
batches of `--batch-size` faces under `torch.inference_mode`
-> one output row per face: source, frame, face index, box, detection score, the top expression, the probability
of each expression (columns named as `aucvt_zoo.labels.EXPRESSIONS`) and of each AU (columns `AU1`, `AU12`, ...),
and an `error` column that says why a source gave no face (unreadable file, no face found). The run never stops on
a bad file. At most one batch of faces (and one detection chunk of frames) is held at a time, so memory stays
flat over long videos.

Python: `Predictor('aucvt_openface').predict(['a.jpg', pil_image, aligned_tensor])`, `.predict_video('clip.mp4')`.
"""
import argparse
import csv
import glob as globlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from .align import align_face, align_faces, alignment_score, template_from_cfg
from .detect import DetectorUnavailableError, Face, FaceDetector, create_detector, faces_from_landmarks
from .hub import PretrainedWeightsError
from .labels import EXPRESSIONS

__all__ = ['Predictor', 'FaceResult', 'load_model', 'iter_sources', 'read_landmarks_csv', 'main']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.pgm')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg', '.wmv', '.flv')
ALIGNMENT_THRESHOLD = 0.35  # `alignment_score` below which --aligned crops are reported as probably unaligned

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass
class FaceResult:
    """The prediction for one face (or, with `error` set, for a source that gave none).

    Attributes:
        source: file path, or '<input i>' for in-memory images.
        frame: video frame index (0-based), None for still images.
        face: index of the face in its image or frame, most confident first; -1 on error rows.
        box: (x1, y1, x2, y2) in image pixels (the whole image for aligned inputs).
        score: detection confidence (NaN when the face was not detected: aligned input, given landmarks).
        expressions: probability of each expression, by name.
        aus: probability of each AU, by name (empty for models without an AU head).
        landmarks: the (5, 2) points the face was aligned with.
        error: why there is no prediction ('' when there is one).
    """
    source: str
    frame: Optional[int]
    face: int
    box: Optional[Tuple[float, float, float, float]] = None
    score: float = float('nan')
    expressions: Dict[str, float] = field(default_factory=dict)
    aus: Dict[str, float] = field(default_factory=dict)
    landmarks: Optional[np.ndarray] = None
    error: str = ''

    @property
    def expression(self) -> str:
        """The most probable expression ('' on error rows)."""
        return max(self.expressions, key=self.expressions.get) if self.expressions else ''

    def as_row(self) -> Dict[str, Any]:
        """Flat dict: source, frame, face, x1, y1, x2, y2, score, expression, expression and AU columns, error."""
        box = self.box if self.box is not None else (None,) * 4
        row: Dict[str, Any] = dict(source=self.source, frame=self.frame, face=self.face)
        row.update(zip(('x1', 'y1', 'x2', 'y2'), (None if v is None else round(float(v), 2) for v in box)))
        row['score'] = None if math.isnan(self.score) else round(self.score, 5)
        row['expression'] = self.expression
        row.update(self.expressions)
        row.update(self.aus)
        row['error'] = self.error
        return row


@dataclass
class _Frame:
    """One decoded image on its way through the pipeline."""
    source: str
    frame: Optional[int]
    image: Optional[np.ndarray] = None
    error: str = ''
    faces: Optional[List[Face]] = None
    crop: Optional[torch.Tensor] = None  # an aligned float (3, H, W) input in [0, 1], kept unquantised
    fps: Optional[float] = None  # frames per second of the frames taken from a video (after --every)


def load_model(
        model: Union[str, nn.Module] = 'aucvt_openface',
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        pretrained: bool = True,
) -> nn.Module:
    """A model by zoo/timm name, 'hf-hub:<repo>' name, or an architecture name plus local weights.

    Args:
        model: a registered name ('aucvt_openface'), 'hf-hub:<repo>' / 'local-dir:<folder>', or an nn.Module.
        checkpoint: local weights: a folder in timm's Hub format (config.json + model.safetensors, as the trainer
            writes; `model` is then read from it), or a .safetensors / .pth file for the architecture `model`.
        pretrained: load the name's published weights when no checkpoint is given (False: random weights).
    """
    if isinstance(model, nn.Module):
        return model
    if checkpoint is None:
        return timm.create_model(model, pretrained=pretrained)
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(
                f'Checkpoint folder {path} has no config.json; a folder must be in timm\'s Hub format (config.json + '
                f'model.safetensors). For a bare weight file pass the file and --model <architecture>.')
        return timm.create_model(f'local-dir:{path}', pretrained=True)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    return timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _auto_device(device: Union[str, torch.device, None]) -> torch.device:
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 array of any PIL image: EXIF rotation applied, alpha composited over black, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.
        image = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        # black, as the alignment fills the outside of an image
        background = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"))


def _read_image(path: str) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # decode now, so truncated files fail here with the file named
        return _to_rgb_array(image)


def _iter_video(path: str, every: int = 1) -> Iterator[Tuple[int, np.ndarray, Optional[float]]]:
    """(frame index, RGB uint8 frame, fps) for every `every`-th frame, decoded one at a time (PyAV, else OpenCV)."""
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError('the file has no video stream')
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            fps = float(stream.average_rate) if stream.average_rate else None
            for i, frame in enumerate(container.decode(stream)):
                if i % every == 0:
                    yield i, frame.to_ndarray(format='rgb24'), fps
        return
    try:
        import cv2
    except ImportError:
        raise ImportError(
            'Reading video needs PyAV (pip install "aucvt_zoo[video]") or OpenCV (pip install '
            'opencv-python-headless).') from None
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ValueError('OpenCV cannot open it as a video')
    fps = cap.get(cv2.CAP_PROP_FPS) or None
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % every == 0:
                yield i, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), fps
            i += 1
    finally:
        cap.release()


def _is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def iter_sources(inputs: Sequence[str], pattern: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """(path, error) for every file named by `inputs`: files, folders (recursive) and glob patterns.

    In folders only files whose name matches `pattern` (a glob such as '*.jpg'; default: known image and video
    extensions) are taken, sorted. A name that matches nothing yields (name, error).
    """
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).rglob(pattern or '*') if p.is_file() and (
                    pattern is not None or p.name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)))
            if not found:
                yield item, f'no {"files matching " + repr(pattern) if pattern else "image or video files"} in folder'
            for p in found:
                yield p, ''
        elif os.path.isfile(item):
            yield item, ''
        elif globlib.has_magic(item):
            found = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                yield item, 'the pattern matches no file'
            for p in found:
                yield p, ''
        else:
            yield item, 'no such file or folder'


def read_landmarks_csv(path: Union[str, os.PathLike]) -> Dict[Tuple[str, Optional[int]], List[np.ndarray]]:
    """Landmarks per (source, frame) from a CSV with columns source, [frame], x_0..x_{K-1}, y_0..y_{K-1}.

    K is 5 (eye left, eye right, nose, mouth left, mouth right, in image terms) or 68 (iBUG, as OpenFace writes
    them: its ' x_0' headers with leading spaces are accepted). One row per face; sources match by path as written
    or by file name. `frame` is the 0-based frame index (OpenFace counts from 1: subtract 1).
    """
    out: Dict[Tuple[str, Optional[int]], List[np.ndarray]] = {}
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        k = sum(1 for h in fields if h.startswith('x_'))
        if 'source' not in fields or k not in (5, 68) or any(f'y_{i}' not in fields for i in range(k)):
            raise ValueError(
                f'{path}: a landmarks CSV needs the columns source, optional frame, x_0..x_4 and y_0..y_4 (or '
                f'x_0..x_67 / y_0..y_67); found {", ".join(fields)}.')
        for line, row in enumerate(reader, start=2):
            row = {(h or '').strip(): v for h, v in row.items()}
            try:
                pts = np.array([[float(row[f'x_{i}']), float(row[f'y_{i}'])] for i in range(k)])
                frame = int(float(row['frame'])) if row.get('frame', '').strip() else None
            except (TypeError, ValueError) as err:
                raise ValueError(f'{path}, line {line}: {err}; every x_i / y_i must be a number.') from None
            out.setdefault((row['source'].strip(), frame), []).append(pts)
    return out


def _lookup_landmarks(table, source: str, frame: Optional[int]) -> Optional[List[np.ndarray]]:
    for key in ((source, frame), (os.path.normpath(source), frame), (os.path.basename(source), frame)):
        if key in table:
            return table[key]
    return None


def _stack_landmarks(given: List[np.ndarray]) -> np.ndarray:
    """(N, K, 2) from a list of per-face (K, 2) or per-image (n, K, 2) landmark arrays."""
    arrays = [np.asarray(g, dtype=np.float64) for g in given]
    return np.concatenate([a.reshape(-1, a.shape[-2], 2) for a in arrays])


class _Progress:
    """Faces/s on stderr: one rewritten line on a terminal, a plain line every `interval` s otherwise."""

    def __init__(self, enabled: bool = True, stream=None, interval: float = 10.):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.start = self.last = time.perf_counter()
        self.sources = self.faces = self.errors = 0

    def update(self, result: FaceResult, new_source: bool) -> None:
        self.sources += new_source
        self.faces += result.face >= 0
        self.errors += bool(result.error)
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._print(end='\r' if self.tty else '\n')

    def _print(self, end: str) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(f'{self.sources} images/frames, {self.faces} faces, {self.errors} errors, {elapsed:.1f} s, '
              f'{self.faces / elapsed:.1f} faces/s', end=end, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._print(end='\n')


class Predictor:
    """Expression and AU probabilities for faces in images, videos or aligned crops.

    Args:
        model: zoo/timm name, 'hf-hub:<repo>', or an nn.Module (see `load_model`).
        checkpoint: local weights (a Hub-format folder or a .safetensors/.pth file).
        device: 'cpu', 'cuda', ..., or 'auto' (CUDA when available).
        batch_size: faces per model forward.
        detector: a registered detector name ('mtcnn'), a `FaceDetector`, or None (then only aligned inputs and
            inputs with landmarks work). Built on first use, so aligned inputs need no detector installed.
        pretrained: load published weights for a name without checkpoint.
        detect_batch: images of one size (video frames) given to the detector at once.
        detector_kwargs: arguments of the detector (e.g. min_face_size).
        precision: 'auto' runs the fastest path (bf16, channels_last, folded BatchNorm, ...) that keeps expression
            argmax agreement >= 99.5% and max |logit diff| <= 0.02 against fp32 on the first batch of faces
            (`aucvt_zoo.fast.choose_fast_path`; `self.fast_path` says which); 'fp32' is exact fp32 eager;
            'bf16' / 'fp16' force that precision's fastest accepted path.
    """

    def __init__(
            self,
            model: Union[str, nn.Module] = 'aucvt_openface',
            checkpoint: Optional[Union[str, os.PathLike]] = None,
            device: Union[str, torch.device] = 'auto',
            batch_size: int = 32,
            detector: Union[str, FaceDetector, None] = 'mtcnn',
            pretrained: bool = True,
            detect_batch: int = 8,
            detector_kwargs: Optional[Dict[str, Any]] = None,
            precision: str = 'auto',
    ):
        if precision not in ('auto', 'fp32', 'bf16', 'fp16'):
            raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', not {precision!r}.")
        if batch_size < 1 or detect_batch < 1:
            raise ValueError(f'batch_size and detect_batch must be >= 1, got {batch_size} and {detect_batch}.')
        self.device = _auto_device(device)
        self.model = load_model(model, checkpoint, pretrained).to(self.device).eval()
        self.precision = precision
        self.fast_path: Optional[str] = None  # the inference path in use, chosen on the first batch
        self.fast_summary = ''
        self._runner: Optional[nn.Module] = None
        cfg = dict(getattr(self.model, 'pretrained_cfg', None) or {})
        self.cfg = cfg
        self.template, self.crop_size = template_from_cfg(cfg)
        self.mean = torch.tensor(cfg.get('mean', (0.5, 0.5, 0.5)), device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.get('std', (0.5, 0.5, 0.5)), device=self.device).view(1, -1, 1, 1)
        n = getattr(self.model, 'num_classes', len(EXPRESSIONS))
        if n < 1:
            raise ValueError(
                'The model has no classifier (num_classes=0, e.g. a features-only backbone); give a model with an '
                'expression head, e.g. --model aucvt_openface.')
        names = tuple(cfg.get('label_names') or ())
        self.expression_names = names if len(names) == n else EXPRESSIONS if n == len(EXPRESSIONS) else tuple(
            f'class_{i}' for i in range(n))
        self.au_names: Tuple[str, ...] = tuple(getattr(self.model, 'au_names', ()) or ())
        self.batch_size = batch_size
        self.detect_batch = detect_batch
        self._detector_spec = detector
        self._detector_kwargs = dict(detector_kwargs or {})
        self._detector: Optional[FaceDetector] = detector if isinstance(detector, FaceDetector) else None
        self._alignment_checked = False
        self._video_out: Optional[_VideoWriter] = None
        self.save_crops: Optional[Path] = None
        self.annotate: Optional[Path] = None
        # seconds spent per stage, for benchmarks (on CUDA the model time includes waiting for the device)
        self.timings: Dict[str, float] = dict(decode=0., detect=0., align=0., model=0.)

    @property
    def columns(self) -> List[str]:
        """The output columns, in order."""
        return (['source', 'frame', 'face', 'x1', 'y1', 'x2', 'y2', 'score', 'expression']
                + list(self.expression_names) + list(self.au_names) + ['error'])

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            if self._detector_spec is None:
                raise ValueError(
                    'This Predictor has no face detector (detector=None): pass aligned crops (aligned=True) or '
                    'landmarks, or create it with detector="mtcnn".')
            kwargs = dict(self._detector_kwargs)
            kwargs.setdefault('device', self.device)
            self._detector = create_detector(self._detector_spec, **kwargs)
        return self._detector

    # ------------------------------------------------------------------------------------------------ public API
    def predict(
            self,
            inputs: Union[ImageInput, torch.Tensor, Sequence[Union[ImageInput, torch.Tensor]]],
            landmarks: Optional[Sequence[Optional[np.ndarray]]] = None,
            aligned: bool = False,
    ) -> List[FaceResult]:
        """Predictions for images (paths, PIL images, RGB uint8 arrays), folders, videos or aligned crops.

        Args:
            inputs: one input or a list. A float tensor (B, 3, H, W) in [0, 1] (or uint8) is a batch of aligned
                crops; image files, PIL images and arrays are detected and aligned unless `aligned`. Folders and
                glob patterns expand as on the command line; videos give every frame (`predict_video` streams).
            landmarks: per input, the faces' landmarks ((N, 5, 2) or (N, 68, 2)) to align with instead of
                detecting; None entries are detected.
            aligned: the images are already aligned crops (resized to the model's input size if needed).

        Returns:
            One `FaceResult` per face, in input order; an input without faces gives one row with `error` set.
        """
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            inputs = [t for t in inputs]
            aligned = True
        elif not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if landmarks is not None and len(landmarks) != len(inputs):
            raise ValueError(f'landmarks has {len(landmarks)} entries for {len(inputs)} inputs; give one per input.')

        def frames():
            for i, x in enumerate(inputs):
                given = None if landmarks is None else landmarks[i]
                if isinstance(x, (str, os.PathLike)) and given is None and (
                        os.path.isdir(x) or _is_video(str(x)) or globlib.has_magic(str(x))):
                    yield from self._path_frames(iter_sources([str(x)]), 1, {})
                else:
                    yield self._frame_from_input(i, x, given, aligned)
        return list(self._run(frames(), aligned))

    def predict_video(
            self,
            path: Union[str, os.PathLike],
            every: int = 1,
            landmarks: Optional[Dict[int, np.ndarray]] = None,
            aligned: bool = False,
    ) -> Iterator[FaceResult]:
        """Stream predictions for every `every`-th frame of a video (frames decoded one at a time).

        Args:
            path: the video file (needs PyAV, `pip install "aucvt_zoo[video]"`, or OpenCV).
            every: take frame 0, every, 2*every, ...
            landmarks: optional landmarks per frame index, instead of detecting.
            aligned: the frames are aligned face crops.
        """
        table = {(str(path), k): [np.asarray(v)] for k, v in (landmarks or {}).items()}
        return self._run(self._video_frames(str(path), every, table), aligned)

    def iter_paths(
            self,
            paths: Iterable[Tuple[str, str]],
            every: int = 1,
            aligned: bool = False,
            landmarks: Optional[Dict[Tuple[str, Optional[int]], List[np.ndarray]]] = None,
    ) -> Iterator[FaceResult]:
        """Stream predictions for (path, error) pairs as `iter_sources` gives them: images and videos."""
        return self._run(self._path_frames(paths, every, landmarks or {}), aligned)

    # ------------------------------------------------------------------------------------------------ decoding
    def _frame_from_input(self, i: int, x, landmarks, aligned: bool) -> _Frame:
        if isinstance(x, (str, os.PathLike)):
            frame = self._decode_path(str(x))
        elif isinstance(x, Image.Image):
            frame = _Frame(f'<input {i}>', None, image=_to_rgb_array(x))
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            t = t.float() / 255. if t.dtype == torch.uint8 else t.float()
            if t.ndim != 3 or t.shape[0] != 3:
                return _Frame(f'<input {i}>', None, error=f'tensor inputs must be (3, H, W), got {tuple(t.shape)}')
            if aligned and landmarks is None:
                return _Frame(f'<input {i}>', None, crop=t.clamp(0, 1))
            frame = _Frame(f'<input {i}>', None, image=(t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        else:
            arr = np.asarray(x)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                return _Frame(f'<input {i}>', None, error=f'arrays must be uint8 (H, W[, C]), got {arr.dtype} '
                                                           f'{arr.shape}')
            frame = _Frame(f'<input {i}>', None, image=_to_rgb_array(Image.fromarray(arr)))
        if landmarks is not None and not frame.error:
            frame.faces = faces_from_landmarks(landmarks)
        return frame

    def _decode_path(self, path: str) -> _Frame:
        start = time.perf_counter()
        try:
            return _Frame(path, None, image=_read_image(path))
        except Exception as err:  # a bad file is a row, never the end of the run
            return _Frame(path, None, error=f'cannot read image: {type(err).__name__}: {err}')
        finally:
            self.timings['decode'] += time.perf_counter() - start

    def _video_frames(self, path: str, every: int, table) -> Iterator[_Frame]:
        if every < 1:
            raise ValueError(f'every must be >= 1, got {every}.')
        frames = _iter_video(path, every)
        count = 0
        while True:
            start = time.perf_counter()
            try:
                i, image, fps = next(frames)
            except StopIteration:
                break
            except Exception as err:
                yield _Frame(path, None, error=f'cannot read video: {type(err).__name__}: {err}')
                return
            finally:
                self.timings['decode'] += time.perf_counter() - start
            count += 1
            given = _lookup_landmarks(table, path, i)
            faces = None if given is None else faces_from_landmarks(_stack_landmarks(given))
            yield _Frame(path, i, image=image, faces=faces, fps=fps / every if fps else None)
        if count == 0:
            yield _Frame(path, None, error='the video has no decodable frames')

    def _path_frames(self, paths, every, table) -> Iterator[_Frame]:
        for path, error in paths:
            if error:
                yield _Frame(path, None, error=error)
            elif _is_video(path):
                yield from self._video_frames(path, every, table)
            else:
                frame = self._decode_path(path)
                given = _lookup_landmarks(table, path, None)
                if given is not None and not frame.error:
                    frame.faces = faces_from_landmarks(_stack_landmarks(given))
                yield frame

    # ------------------------------------------------------------------------------------------------ pipeline
    def _run(self, frames: Iterable[_Frame], aligned: bool) -> Iterator[FaceResult]:
        """Detect, align and batch faces; yield results in input order, holding at most one batch of faces."""
        pending: List[Tuple[_Frame, List[Face], Optional[torch.Tensor]]] = []
        n_faces = 0
        chunk: List[_Frame] = []
        try:
            for frame in frames:
                chunk.append(frame)
                if len(chunk) < self.detect_batch:
                    continue
                n_faces += self._prepare(chunk, aligned, pending)
                chunk = []
                # faceless frames hold no image (unless annotating), so a long faceless stretch costs only rows
                if n_faces >= self.batch_size or len(pending) >= (self.batch_size if self.annotate else 1024):
                    yield from self._flush(pending, aligned)
                    pending, n_faces = [], 0
            if chunk:
                self._prepare(chunk, aligned, pending)
            if pending:
                yield from self._flush(pending, aligned)
        finally:
            if self._video_out is not None:
                self._video_out.close()
                self._video_out = None

    def _prepare(self, chunk: List[_Frame], aligned: bool, pending: list) -> int:
        """Detect (where needed) and align the faces of a chunk of frames; append to `pending`."""
        todo = [f for f in chunk if not f.error and f.faces is None and not aligned]
        if todo:
            start = time.perf_counter()
            for f, faces in zip(todo, self.detector.detect_batch([f.image for f in todo])):
                f.faces = faces
            self.timings['detect'] += time.perf_counter() - start
        n = 0
        start = time.perf_counter()
        for f in chunk:
            if f.error:
                pending.append((f, [], None))
                continue
            if aligned and f.faces is None:
                if f.crop is not None:
                    crops = f.crop[None].to(self.device)
                else:
                    crops = torch.from_numpy(np.ascontiguousarray(f.image)).to(self.device).permute(2, 0, 1)[None]
                    crops = crops.float() / 255.
                h, w = crops.shape[-2:]
                if (h, w) != tuple(self.crop_size):
                    crops = F.interpolate(crops, size=self.crop_size, mode='bicubic', antialias=True,
                                          align_corners=False).clamp_(0, 1)
                faces = [Face(np.array([0., 0., w - 1., h - 1.]), float('nan'), np.full((5, 2), np.nan))]
            else:
                faces = f.faces or []
                if not faces:
                    f.error = 'no face detected'
                    if not self.annotate:
                        f.image = None
                    pending.append((f, [], None))
                    continue
                crops = self._align(f.image, np.stack([face.landmarks for face in faces]))
            if not self.annotate:
                f.image = None  # only the crops are needed from here on
            pending.append((f, faces, crops))
            n += len(faces)
        self.timings['align'] += time.perf_counter() - start
        return n

    def _align(self, image: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
        """(N, 3, h, w) crops in [0, 1] on the model's device."""
        if self.device.type == 'cpu':
            # Pillow's single-threaded warp: torch's intra-op threads cost more than they save on one small crop
            pil = Image.fromarray(image)
            crops = np.stack([np.asarray(align_face(pil, lm, self.cfg)) for lm in landmarks])
            return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        return align_faces(tensor, landmarks, cfg=self.cfg)

    def _choose_path(self, x: torch.Tensor) -> nn.Module:
        """The model as it will run: fp32 eager, or the fastest path that passes the check on batch `x`."""
        if self.precision == 'fp32':
            self.fast_path = 'fp32 eager'
            return self.model
        from .fast import choose_fast_path
        choice = choose_fast_path(self.model, x, precision=None if self.precision == 'auto' else self.precision)
        self.fast_path = choice.path.name
        self.fast_summary = f'checked against fp32 eager on {x.shape[0]} faces:\n{choice.summary()}'
        return choice.model

    @torch.inference_mode()
    def _forward(self, crops: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = (crops - self.mean) / self.std
        if self._runner is None:
            self._runner = self._choose_path(x)
        model = self._runner
        if self.au_names and hasattr(model, 'forward_with_aus'):
            expr, au = model.forward_with_aus(x)
            return expr.float().softmax(-1).cpu(), au.float().sigmoid().cpu()
        return model(x).float().softmax(-1).cpu(), None

    def _flush(self, pending: list, aligned: bool) -> Iterator[FaceResult]:
        crops = [c for _, _, c in pending if c is not None]
        all_crops = torch.cat(crops) if crops else torch.empty(0)
        if aligned and not self._alignment_checked and all_crops.shape[0]:
            self._alignment_checked = True
            self._check_alignment(all_crops, [f.source for f, faces, c in pending if c is not None])
        start = time.perf_counter()
        expr_parts, au_parts = [], []
        for i in range(0, all_crops.shape[0], self.batch_size):
            e, a = self._forward(all_crops[i:i + self.batch_size])
            expr_parts.append(e)
            au_parts.append(a)
        self.timings['model'] += time.perf_counter() - start
        expr = torch.cat(expr_parts).numpy() if expr_parts else np.zeros((0, len(self.expression_names)))
        aus = torch.cat(au_parts).numpy() if au_parts and au_parts[0] is not None else None
        k = 0
        for f, faces, c in pending:
            if c is None:
                self._save_extras(f, None, [])
                yield FaceResult(f.source, f.frame, -1, error=f.error)
                continue
            results = []
            for j, face in enumerate(faces):
                results.append(FaceResult(
                    f.source, f.frame, j, tuple(float(v) for v in face.box), face.score,
                    dict(zip(self.expression_names, (float(p) for p in expr[k]))),
                    dict(zip(self.au_names, (float(p) for p in aus[k]))) if aus is not None else {},
                    None if np.isnan(face.landmarks).all() else face.landmarks))
                k += 1
            self._save_extras(f, c, results)
            yield from results

    def _check_alignment(self, crops: torch.Tensor, sources: List[str]) -> None:
        scores = alignment_score(crops[:64]).cpu()
        if float(scores.median()) < ALIGNMENT_THRESHOLD:
            worst = sources[int(scores.argmin())] if len(sources) == crops.shape[0] else sources[0]
            warnings.warn(
                f'The aligned inputs (--aligned, aligned=True or crop tensors) do not look like template-aligned '
                f'faces (median left-right symmetry {float(scores.median()):.2f} < {ALIGNMENT_THRESHOLD}; least '
                f'aligned: {worst}). The models expect faces warped onto the 5-point template (docs/predict.md); '
                f'predictions on unaligned crops can be much worse. Drop --aligned (aligned=False) to detect and '
                f'align the faces.', stacklevel=3)

    def _save_extras(self, f: _Frame, crops: Optional[torch.Tensor], results: List[FaceResult]) -> None:
        if not (self.save_crops or self.annotate):
            return
        stem = _output_stem(f.source, f.frame)
        if self.save_crops and crops is not None:
            self.save_crops.mkdir(parents=True, exist_ok=True)
            arr = (crops.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for r, a in zip(results, arr):
                Image.fromarray(a).save(self.save_crops / f'{stem}_face{r.face}.png')
        # faceless frames still go into an annotated video (it keeps its timing); faceless still images do not
        if self.annotate and f.image is not None and (results or f.frame is not None):
            self.annotate.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(f.image)
            draw = ImageDraw.Draw(image)
            width = max(1, round(max(image.size) / 300))
            for r in results:
                x1, y1, x2, y2 = r.box
                draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=width)
                if r.landmarks is not None:
                    for x, y in r.landmarks:
                        draw.ellipse([x - width, y - width, x + width, y + width], fill=(255, 0, 0))
                top_aus = sorted(r.aus, key=r.aus.get, reverse=True)[:3]
                label = f'{r.face}: {r.expression} {r.expressions[r.expression]:.2f}' + (
                    ' ' + ' '.join(top_aus) if top_aus else '')
                draw.text((x1, max(0, y1 - 12)), label, fill=(255, 255, 0))
            self._save_annotated(f, image, stem)
            f.image = None

    def _save_annotated(self, f: _Frame, image: Image.Image, stem: str) -> None:
        """Still images as JPEG; video frames into one annotated video per source (PyAV), else JPEGs per frame."""
        if f.frame is None or not _VideoWriter.available():
            image.save(self.annotate / f'{stem}.jpg', quality=92)
            return
        if self._video_out is None or self._video_out.source != f.source:
            if self._video_out is not None:
                self._video_out.close()
            self._video_out = _VideoWriter(
                f.source, self.annotate / f'{_output_stem(f.source, None)}.mp4', image.size, f.fps or 25.)
        self._video_out.write(image)


class _VideoWriter:
    """An annotated video, frame by frame (H.264 when PyAV's FFmpeg has it, else MPEG-4 part 2)."""

    def __init__(self, source: str, path: Path, size: Tuple[int, int], fps: float):
        import av
        from fractions import Fraction
        self.source = source
        self.container = av.open(str(path), 'w')
        codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        # yuv420p needs even sizes: the last odd row/column is dropped
        self.size = (size[0] - size[0] % 2, size[1] - size[1] % 2)
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = 'yuv420p'

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec('av') is not None

    def write(self, image: Image.Image) -> None:
        import av
        if image.size != self.size:
            image = image.crop((0, 0) + self.size)
        self.container.mux(self.stream.encode(av.VideoFrame.from_image(image)))

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def _output_stem(source: str, frame: Optional[int]) -> str:
    """A file-name-safe, collision-free stem for a source (and frame): the path with separators replaced."""
    stem = os.path.splitext(os.path.normpath(source))[0].lstrip(os.sep).replace(os.sep, '__').replace(':', '_')
    stem = stem.replace('..__', 'up__')
    return stem if frame is None else f'{stem}_f{frame:06d}'


# ---------------------------------------------------------------------------------------------------- writers
class _Writer:
    """Streaming CSV / JSONL / Parquet writer of result rows."""

    def __init__(self, path: str, fmt: str, columns: List[str]):
        self.fmt, self.columns, self.path = fmt, columns, path
        self._rows: List[Dict[str, Any]] = []
        if fmt == 'parquet':
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(
                    '--format parquet needs pyarrow: pip install pyarrow (or write CSV / JSONL).') from None
            if path == '-':
                raise ValueError('Parquet cannot go to stdout; give --output FILE.parquet.')
            types = {'source': pa.string(), 'frame': pa.int64(), 'face': pa.int64(), 'expression': pa.string(),
                     'error': pa.string()}
            self._schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
            self._pa = pa
            self._parquet = pq.ParquetWriter(path, self._schema)
            return
        self._file = sys.stdout if path == '-' else open(path, 'w', newline='')
        if fmt == 'csv':
            self._csv = csv.DictWriter(self._file, fieldnames=columns)
            self._csv.writeheader()

    def write(self, row: Dict[str, Any]) -> None:
        if self.fmt == 'csv':
            self._csv.writerow({k: '' if v is None else v for k, v in row.items()})
        elif self.fmt == 'jsonl':
            self._file.write(json.dumps(row) + '\n')
        else:
            self._rows.append(row)
            if len(self._rows) >= 4096:  # one row group per 4096 rows keeps memory flat
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        if self._rows:
            self._parquet.write_table(self._pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        if self.fmt == 'parquet':
            self._flush_parquet()
            self._parquet.close()
        elif self._file is not sys.stdout:
            self._file.close()
        else:
            self._file.flush()


def _format_for(path: str, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    return {'.jsonl': 'jsonl', '.json': 'jsonl', '.parquet': 'parquet', '.pq': 'parquet'}.get(suffix, 'csv')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m aucvt_zoo.predict',
        description='Expression and AU probabilities for every face in images, folders and videos.')
    p.add_argument('inputs', nargs='+', help='image or video files, folders (searched recursively), glob patterns')
    p.add_argument('--model', default='aucvt_openface',
                   help="zoo/timm model name or 'hf-hub:<repo>' (default: aucvt_openface)")
    p.add_argument('--checkpoint', default=None,
                   help='local weights: a Hub-format folder (config.json + model.safetensors) or a .safetensors/.pth '
                        'file for --model')
    p.add_argument('--device', default='auto', help="'cpu', 'cuda', 'cuda:1', ... (default: CUDA when available)")
    p.add_argument('--batch-size', type=int, default=32, help='faces per model forward (default 32)')
    p.add_argument('--glob', default=None, help="file pattern inside folders, e.g. '*.jpg' (default: images, videos)")
    p.add_argument('--aligned', action='store_true',
                   help='inputs are aligned face crops: skip detection (resized to the model input if needed)')
    p.add_argument('--landmarks', default=None,
                   help='CSV of landmarks to align with instead of detecting: source, [frame], x_0.., y_0.. (5 or 68)')
    p.add_argument('--detector', default='mtcnn', help='face detector (default mtcnn; needs aucvt_zoo[detect])')
    p.add_argument('--min-face-size', type=float, default=20., help='smallest face to detect, pixels (default 20)')
    p.add_argument('--every', type=int, default=1, help='video: take every N-th frame (default 1)')
    p.add_argument('--output', '-o', default='-', help='output file (default: CSV to stdout)')
    p.add_argument('--format', choices=('csv', 'jsonl', 'parquet'), default=None,
                   help='output format (default: from the --output suffix, else csv)')
    p.add_argument('--save-crops', default=None, help='folder for the aligned face crops (PNG)')
    p.add_argument('--annotate', default=None, help='folder for images/frames annotated with boxes and predictions')
    p.add_argument('--precision', choices=('auto', 'fp32', 'bf16', 'fp16'), default='auto',
                   help="'auto': the fastest path within argmax agreement 99.5%% and |logit diff| 0.02 of fp32 on the "
                        "first batch (reported on stderr); 'fp32': exact (default: auto)")
    p.add_argument('--quiet', action='store_true', help='no progress on stderr')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point. Returns 0 once every source is processed (bad sources are rows, not failures), 2 when
    the model cannot be built or detection is needed but its extra is not installed."""
    args = _parser().parse_args(argv)
    if args.every < 1 or args.batch_size < 1:
        raise SystemExit('--every and --batch-size must be >= 1.')
    fmt = _format_for(args.output, args.format)
    try:
        predictor = Predictor(
            args.model, args.checkpoint, device=args.device, batch_size=args.batch_size, detector=args.detector,
            detector_kwargs=dict(min_face_size=args.min_face_size), precision=args.precision)
    except (PretrainedWeightsError, FileNotFoundError, ValueError, RuntimeError) as err:
        # a model that cannot be built is the user's to fix: the message says how, a traceback adds nothing
        print(f'error: {err}\n(local weights: --checkpoint FOLDER_OR_FILE; see docs/predict.md)', file=sys.stderr)
        return 2
    if not args.aligned and not args.landmarks:
        try:  # fail before the first file, not in the middle of a run
            predictor.detector
        except DetectorUnavailableError as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
    predictor.save_crops = Path(args.save_crops) if args.save_crops else None
    predictor.annotate = Path(args.annotate) if args.annotate else None
    table = read_landmarks_csv(args.landmarks) if args.landmarks else None
    writer = _Writer(args.output, fmt, predictor.columns)
    progress = _Progress(enabled=not args.quiet)
    last_source = None
    try:
        for result in predictor.iter_paths(iter_sources(args.inputs, args.glob), args.every, args.aligned, table):
            writer.write(result.as_row())
            progress.update(result, new_source=(result.source, result.frame) != last_source)
            last_source = (result.source, result.frame)
            if result.error and result.frame is None:  # faceless video frames are only counted
                print(f'{result.source}: {result.error}', file=sys.stderr)
    finally:
        writer.close()
        progress.close()
    if predictor.fast_path and not args.quiet:
        print(f'inference path: {predictor.fast_path} (--precision {args.precision}) {predictor.fast_summary}',
              file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
