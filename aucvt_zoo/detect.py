"""Face detection with 5 landmarks, behind a small interface so any detector (or a user's own landmarks) plugs in.

The built-in detector is MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016, arXiv:1604.02878), run in PyTorch by this module. Its weights are the ones
the `mtcnn` package (MIT licence, github ipazc/mtcnn) installs inside its wheel, so `pip install aucvt_zoo[detect]`
is all a user needs and nothing downloads at first use; TensorFlow is not needed, only the package's weight files
(read with joblib, which `mtcnn` depends on). MTCNN is also the detector whose 5 landmarks defined the ArcFace /
face.evoLVe crops the zoo's IR-50 was trained on. docs/predict.md compares it with the alternatives.

A detector is anything with `detect(image) -> List[Face]` (and optionally a faster `detect_batch`); register more
with `register_detector`. `faces_from_landmarks` turns landmarks from OpenFace, RetinaFace, dlib or MediaPipe
pipelines into `Face`s, so detection is optional.
"""
import abc
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .align import to_five_points

__all__ = [
    'Face', 'FaceDetector', 'MtcnnDetector', 'DETECTORS', 'register_detector', 'create_detector',
    'faces_from_landmarks', 'DetectorUnavailableError',
]


class DetectorUnavailableError(ImportError):
    """A detector's optional dependency or weights are not installed; the message says what to install."""


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: (x1, y1, x2, y2) in image pixels.
        score: detector confidence in [0, 1] (NaN for faces given by landmarks).
        landmarks: (5, 2) points (x, y): eye image-left, eye image-right, nose tip, mouth image-left, mouth
            image-right (the order of `aucvt_zoo.align.ARCFACE_TEMPLATE`).
    """
    box: np.ndarray
    score: float
    landmarks: np.ndarray


class FaceDetector(abc.ABC):
    """Interface of a face detector: RGB uint8 (H, W, 3) images in, a list of `Face`s per image out."""
    name: str = 'detector'

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> List[Face]:
        """Faces in one RGB uint8 (H, W, 3) image, most confident first."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> List[List[Face]]:
        """Faces in each of several images; detectors that batch (e.g. video frames of one size) override this."""
        return [self.detect(image) for image in images]


def faces_from_landmarks(landmarks: Union[np.ndarray, Sequence]) -> List[Face]:
    """`Face`s for landmarks a user already has: (N, 5, 2) or (N, 68, 2) points (one face: (5, 2) or (68, 2)).

    The box is the landmarks' bounding box grown to cover the face (eyes-to-mouth distance x 1.0 above the eyes
    and 0.6 below the mouth), for drawing and the output's box columns; the alignment uses only the points.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    all_pts = pts[None] if pts.ndim == 2 else pts
    five = to_five_points(all_pts)
    faces = []
    for p, full in zip(five, all_pts):
        eyes, mouth = p[:2].mean(0), p[3:].mean(0)
        span = max(float(np.linalg.norm(mouth - eyes)), 1.0)
        x1, x2 = min(full[:, 0].min(), p[:, 0].min() - 0.6 * span), max(full[:, 0].max(), p[:, 0].max() + 0.6 * span)
        y1, y2 = min(full[:, 1].min(), eyes[1] - span), max(full[:, 1].max(), mouth[1] + 0.6 * span)
        faces.append(Face(np.array([x1, y1, x2, y2]), float('nan'), p))
    return faces


# ---------------------------------------------------------------------------------------------- MTCNN networks
# Layer for layer the networks of the `mtcnn` package (its Keras models, weights converted from the authors'
# Caffe release). Keras 'same' max pooling pads only at the end for every size these nets meet, which is what
# ceil_mode=True does. Keras flattens (W, H, C)-permuted maps; `_flatten_whc` reproduces that order.

def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).flatten(1)


class _PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 windows at stride 2 -> face probability and box offsets."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(10, 16, 3), nn.PReLU(16),
            nn.Conv2d(16, 32, 3), nn.PReLU(32),
        )
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        x = self.body(x)
        return self.box(x), self.cls(x).softmax(1)[:, 1]


class _RNet(nn.Module):
    """Refinement net on 24x24 crops -> face probability and box offsets."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2),
            nn.Conv2d(48, 64, 2), nn.PReLU(64),
        )
        self.fc = nn.Linear(576, 128)
        self.act = nn.PReLU(128)
        self.box = nn.Linear(128, 4)
        self.cls = nn.Linear(128, 2)

    def forward(self, x):
        x = self.act(self.fc(_flatten_whc(self.body(x))))
        return self.box(x), self.cls(x).softmax(1)[:, 1]


class _ONet(nn.Module):
    """Output net on 48x48 crops -> face probability, box offsets and the 5 landmarks."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128),
        )
        self.fc = nn.Linear(1152, 256)
        self.act = nn.PReLU(256)
        self.box = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)
        self.cls = nn.Linear(256, 2)

    def forward(self, x):
        x = self.act(self.fc(_flatten_whc(self.body(x))))
        return self.box(x), self.landmarks(x), self.cls(x).softmax(1)[:, 1]


def _mtcnn_weights_dir() -> str:
    """The folder of the `mtcnn` package's weight files, found without importing the package (it imports TF)."""
    spec = importlib.util.find_spec('mtcnn')
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailableError(
            'The MTCNN face detector needs the weights of the `mtcnn` package: pip install "aucvt_zoo[detect]" '
            '(or pip install mtcnn). Or skip detection: pass --aligned for aligned 112x112 crops, or give '
            'landmarks (--landmarks / Predictor.predict(..., landmarks=...)).')
    folder = os.path.join(list(spec.submodule_search_locations)[0], 'assets', 'weights')
    if not os.path.isfile(os.path.join(folder, 'onet.lz4')):
        raise DetectorUnavailableError(
            f'The `mtcnn` package is installed but its weight files are not in {folder} (expected pnet.lz4, '
            f'rnet.lz4, onet.lz4 as in mtcnn>=1.0): pip install --force-reinstall "mtcnn>=1.0".')
    return folder


def _load_keras_weights(net: nn.Module, arrays: List[np.ndarray], name: str) -> None:
    """Copy the `mtcnn` package's Keras weight list (layer order, HWIO kernels) into `net`, checking every shape."""
    # the nets register their parameters in the Keras layer order (heads too: box, [landmarks,] class), so the
    # two lists pair up one to one
    params = list(net.parameters())
    if len(params) != len(arrays):
        raise ValueError(f'MTCNN {name}: {len(arrays)} weight arrays in the file, the network has {len(params)}.')
    for p, a in zip(params, arrays):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim == 4:      # conv kernel (kh, kw, in, out) -> (out, in, kh, kw)
            a = a.transpose(3, 2, 0, 1)
        elif a.ndim == 3:    # PReLU alpha shared over H, W: (1, 1, C) -> (C,)
            a = a.reshape(-1)
        elif a.ndim == 2:    # dense (in, out) -> (out, in)
            a = a.T
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f'MTCNN {name}: weight of shape {a.shape} does not fit parameter {tuple(p.shape)}.')
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(a)))


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS with overlap = intersection / smaller area (MTCNN's last stage), indices kept, best first."""
    order = np.argsort(-scores)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]))
        h = np.maximum(0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]))
        overlap = w * h / np.maximum(np.minimum(area[i], area[rest]), 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=int)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow (N, 4) boxes to squares about their centres."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def _crops(images: torch.Tensor, index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """size x size bilinear samples spanning each box (corners included), zeros outside the image."""
    hh, ww = images.shape[-2:]
    t = torch.linspace(0, 1, size, device=images.device, dtype=images.dtype)
    xs = boxes[:, 0:1] + t * (boxes[:, 2:3] - boxes[:, 0:1])    # (N, size) pixel indices
    ys = boxes[:, 1:2] + t * (boxes[:, 3:4] - boxes[:, 1:2])
    gx = (2 * xs + 1) / ww - 1
    gy = (2 * ys + 1) / hh - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
    return F.grid_sample(images[index], grid, mode='bilinear', padding_mode='zeros', align_corners=False)


class MtcnnDetector(FaceDetector):
    """MTCNN in PyTorch with the weights the `mtcnn` package ships (no download).

    Args:
        min_face_size: smallest face (pixels) searched for; larger is faster.
        thresholds: face-probability thresholds of the proposal, refinement and output nets.
        scale_factor: image pyramid step.
        device: torch device the nets run on.
    """
    name = 'mtcnn'

    def __init__(
            self,
            min_face_size: float = 20.,
            thresholds: Sequence[float] = (0.6, 0.7, 0.8),
            scale_factor: float = 0.709,
            device: Union[str, torch.device] = 'cpu',
    ):
        import joblib  # a dependency of `mtcnn`; only needed to read its weight files
        folder = _mtcnn_weights_dir()
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, name in ((self.pnet, 'pnet'), (self.rnet, 'rnet'), (self.onet, 'onet')):
            # joblib unpickles: these files come from the installed package, as trusted as its code
            _load_keras_weights(net, joblib.load(os.path.join(folder, f'{name}.lz4')), name)
            net.to(self.device).eval()

    def detect(self, image: np.ndarray) -> List[Face]:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> List[List[Face]]:
        """Faces in each image; images of one size (video frames) run through the nets together."""
        out: List[Optional[List[Face]]] = [None] * len(images)
        by_size: Dict[tuple, List[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(np.asarray(image).shape, []).append(i)
        for shape, idx in by_size.items():
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f'MTCNN takes RGB uint8 (H, W, 3) images, got shape {shape}.')
            for i, faces in zip(idx, self._detect_same_size(np.stack([np.asarray(images[i]) for i in idx]))):
                out[i] = faces
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _detect_same_size(self, batch: np.ndarray) -> List[List[Face]]:
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - 127.5) / 128.  # the normalisation MTCNN was trained with
        b, _, h, w = x.shape
        empty: List[List[Face]] = [[] for _ in range(b)]

        # stage 1: proposals over an image pyramid; the first scale maps min_face_size onto PNet's 12 px window
        boxes, scores, index = [], [], []
        scale = 12. / self.min_face_size
        while min(h, w) * scale >= 12:
            hs, ws = int(math.ceil(h * scale)), int(math.ceil(w * scale))
            reg, prob = self.pnet(F.interpolate(x, size=(hs, ws), mode='area'))
            bi, yi, xi = torch.nonzero(prob > self.thresholds[0], as_tuple=True)
            if bi.numel():
                r = reg[bi, :, yi, xi]
                # a PNet cell (y, x) covers [2x + 1, 2x + 12] of the scaled image (the reference implementation's
                # 1-based convention), offsets in units of the 11 px cell
                x1, y1 = 2 * xi + 1 + r[:, 0] * 11, 2 * yi + 1 + r[:, 1] * 11
                x2, y2 = 2 * xi + 12 + r[:, 2] * 11, 2 * yi + 12 + r[:, 3] * 11
                bx = torch.stack([x1, y1, x2, y2], 1) / scale
                sc = prob[bi, yi, xi]
                keep = batched_nms(bx, sc, bi, 0.5)
                boxes.append(bx[keep]), scores.append(sc[keep]), index.append(bi[keep])
            scale *= self.scale_factor
        if not boxes:
            return empty
        bx, sc, bi = torch.cat(boxes), torch.cat(scores), torch.cat(index)
        keep = batched_nms(bx, sc, bi, 0.7)
        bx, bi = _square(bx[keep]), bi[keep]

        # stage 2: refine on 24x24 crops
        reg, sc = self.rnet(_crops(x, bi, bx, 24))
        keep = sc > self.thresholds[1]
        bx, bi, reg, sc = bx[keep], bi[keep], reg[keep], sc[keep]
        if not bx.numel():
            return empty
        bx = self._apply_offsets(bx, reg)
        keep = batched_nms(bx, sc, bi, 0.7)
        bx, bi = _square(bx[keep]), bi[keep]

        # stage 3: boxes, scores and landmarks on 48x48 crops
        reg, lm, sc = self.onet(_crops(x, bi, bx, 48))
        size = bx[:, 2:] - bx[:, :2] + 1
        lx = bx[:, 0:1] + size[:, 0:1] * lm[:, 0:5] - 1
        ly = bx[:, 1:2] + size[:, 1:2] * lm[:, 5:10] - 1
        bx = self._apply_offsets(bx, reg)
        keep = sc > self.thresholds[2]
        bx, bi, sc = bx[keep].cpu().numpy(), bi[keep].cpu().numpy(), sc[keep].cpu().numpy()
        pts = torch.stack([lx[keep], ly[keep]], -1).cpu().numpy().astype(np.float64)
        for image_id in range(b):
            sel = np.nonzero(bi == image_id)[0]
            if not sel.size:
                continue
            sel = sel[_nms_min(bx[sel], sc[sel], 0.7)]
            for j in sel:
                box = bx[j].astype(np.float64)
                box[[0, 2]] = box[[0, 2]].clip(0, w - 1)
                box[[1, 3]] = box[[1, 3]].clip(0, h - 1)
                empty[image_id].append(Face(box, float(sc[j]), pts[j]))
        return empty

    @staticmethod
    def _apply_offsets(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        size = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)
        return boxes + reg * size


DETECTORS: Dict[str, Callable[..., FaceDetector]] = {'mtcnn': MtcnnDetector}


def register_detector(name: str, factory: Callable[..., FaceDetector]) -> None:
    """Make `create_detector(name)` (and `--detector name`) build `factory(**kwargs)`."""
    DETECTORS[name] = factory


def create_detector(name: str = 'mtcnn', **kwargs) -> FaceDetector:
    """Build a registered detector by name (`DETECTORS`)."""
    if name not in DETECTORS:
        raise ValueError(f'Unknown face detector {name!r}; known: {", ".join(DETECTORS)} (register_detector adds one).')
    return DETECTORS[name](**kwargs)
