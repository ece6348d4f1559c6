"""Face alignment: a similarity transform from facial landmarks onto the crop template of a model, and the warp.

Every zoo model reads an aligned 112x112 face, the crop its IR-50 trunk was trained on (MS-Celeb-1M as aligned by
face.evoLVe / InsightFace: a similarity transform that puts 5 MTCNN landmarks on fixed points). Feeding a face
aligned any other way silently costs accuracy, so the template is data a model can state in its pretrained config:

    model.pretrained_cfg['face_template'] = ((x, y) * 5)   # pixels of the model's input, optional
    model.pretrained_cfg['input_size'] = (3, H, W)         # the crop size

Without `face_template` the ArcFace template below is used, scaled from 112x112 to (H, W). Landmark order is the
one detectors emit: eye on the image's left (the subject's right eye), eye on the image's right, nose tip, mouth
corner on the image's left, mouth corner on the image's right. Coordinates are pixel indices (pixel (0, 0) is
centred on (0, 0)), as in OpenCV, MTCNN, RetinaFace and OpenFace output.

Two warps share one transform: `align_face` (Pillow, one face, a PIL image out) and `align_faces` (torch
`grid_sample`, many faces from a batch of images, on any device). Both use bicubic interpolation and average the
image down first when a face is more than twice the crop's size, so large faces are not aliased.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    'ARCFACE_TEMPLATE', 'ARCFACE_SIZE', 'FACE_TEMPLATE_KEY', 'template_from_cfg', 'to_five_points',
    'estimate_similarity', 'transform_points', 'align_face', 'align_faces', 'alignment_score', 'looks_aligned',
]

# ArcFace / face.evoLVe 5-point template for a 112x112 crop (InsightFace `arcface_dst`), (x, y) in pixels.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],   # eye, image left
    [73.5318, 51.5014],   # eye, image right
    [56.0252, 71.7366],   # nose tip
    [41.5493, 92.3655],   # mouth corner, image left
    [70.7299, 92.2041],   # mouth corner, image right
], dtype=np.float64)
ARCFACE_SIZE = (112, 112)  # (height, width) the template is given for

# The optional pretrained-config key a model uses to state its own template (5 (x, y) points in input pixels).
FACE_TEMPLATE_KEY = 'face_template'

ArrayLike = Union[np.ndarray, Sequence, torch.Tensor]


def template_from_cfg(cfg: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The 5-point template and crop size (height, width) a model expects, from its pretrained config.

    Uses `cfg['face_template']` when present, else the ArcFace template scaled to `cfg['input_size']`.
    """
    cfg = dict(cfg or {})
    size = tuple(int(s) for s in cfg.get('input_size', (3,) + ARCFACE_SIZE)[-2:])
    if cfg.get(FACE_TEMPLATE_KEY) is not None:
        template = np.asarray(cfg[FACE_TEMPLATE_KEY], dtype=np.float64)
        if template.shape != (5, 2):
            raise ValueError(
                f"pretrained_cfg['{FACE_TEMPLATE_KEY}'] must be 5 (x, y) points in input pixels, got shape "
                f'{template.shape}; fix the model config.')
        return template, size
    # Scaling about the origin keeps the crop's framing: the same face fraction fills a larger input.
    scale = np.array([size[1] / ARCFACE_SIZE[1], size[0] / ARCFACE_SIZE[0]])
    return ARCFACE_TEMPLATE * scale, size


def to_five_points(landmarks: ArrayLike) -> np.ndarray:
    """Reduce common landmark layouts to the 5 template points, shape (..., 5, 2).

    Accepts 5 points (returned as is) and the 68-point iBUG layout of OpenFace, dlib and face_alignment (eye
    centres are the means of the eye contours 36-41 and 42-47, nose tip 30, mouth corners 48 and 54).
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim < 2 or pts.shape[-1] != 2:
        raise ValueError(f'Landmarks must be (..., K, 2) arrays of (x, y) points, got shape {pts.shape}.')
    k = pts.shape[-2]
    if k == 5:
        return pts
    if k == 68:
        return np.stack([
            pts[..., 36:42, :].mean(-2), pts[..., 42:48, :].mean(-2), pts[..., 30, :], pts[..., 48, :], pts[..., 54, :],
        ], axis=-2)
    raise ValueError(
        f'Cannot use {k} landmarks per face: give 5 points (eye left, eye right, nose tip, mouth left, mouth right, '
        f'as MTCNN/RetinaFace emit them) or the 68-point iBUG layout (OpenFace, dlib).')


def estimate_similarity(src: ArrayLike, dst: ArrayLike) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) taking points `src` onto `dst`.

    Args:
        src: source points, (K, 2) or a batch (B, K, 2).
        dst: target points, (K, 2) (shared by the batch) or (B, K, 2).

    Returns:
        2x3 matrices [s*R | t] with dst ~= s*R @ src + t, shape (2, 3) or (B, 2, 3). Reflections are excluded.
    """
    src = np.asarray(src, dtype=np.float64)
    single = src.ndim == 2
    src = src[None] if single else src
    dst = np.broadcast_to(np.asarray(dst, dtype=np.float64), src.shape)
    if not np.isfinite(src).all():
        raise ValueError('Landmarks contain NaN or infinite values; the face cannot be aligned.')
    mu_s, mu_d = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum((1, 2)) / src.shape[1]
    cov = np.einsum('bki,bkj->bij', xd, xs) / src.shape[1]
    u, sig, vt = np.linalg.svd(cov)
    # d flips the last singular direction when the best orthogonal fit would be a reflection
    d = np.ones((src.shape[0], 2))
    d[:, 1] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    d[d == 0] = 1.
    rot = u @ (d[:, :, None] * vt)
    scale = (sig * d).sum(1) / np.maximum(var_s, 1e-12)
    lin = scale[:, None, None] * rot
    t = mu_d[:, 0] - np.einsum('bij,bj->bi', lin, mu_s[:, 0])
    m = np.concatenate([lin, t[:, :, None]], axis=2)
    return m[0] if single else m


def transform_points(matrix: ArrayLike, points: ArrayLike) -> np.ndarray:
    """Apply 2x3 affine matrices to (..., K, 2) points (a batch of matrices applies to a batch of point sets)."""
    m, p = np.asarray(matrix, dtype=np.float64), np.asarray(points, dtype=np.float64)
    return np.einsum('...ij,...kj->...ki', m[..., :2], p) + m[..., None, :, 2]


def _invert(m: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affine matrices."""
    lin_inv = np.linalg.inv(m[..., :2])
    return np.concatenate([lin_inv, -np.einsum('...ij,...j->...i', lin_inv, m[..., 2])[..., None]], axis=-1)


def _reduce_factor(m: np.ndarray) -> np.ndarray:
    """Integer down-sampling factor per transform: how many source pixels map onto one crop pixel (floor)."""
    scale = np.sqrt(np.abs(np.linalg.det(m[..., :2])))
    return np.maximum(1, np.floor(1. / np.maximum(scale, 1e-6))).astype(int)


def _to_pil_rgb(image: Union[Image.Image, np.ndarray]) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == 'RGB' else image.convert('RGB')
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f'numpy images must be uint8 (H, W[, 3]), got dtype {arr.dtype}.')
    return Image.fromarray(arr).convert('RGB')


def align_face(
        image: Union[Image.Image, np.ndarray],
        landmarks: ArrayLike,
        cfg: Optional[Dict[str, Any]] = None,
) -> Image.Image:
    """Warp one face onto the template of `cfg` (a model's pretrained config; ArcFace 112x112 by default).

    Args:
        image: an RGB PIL image or uint8 (H, W, 3) array.
        landmarks: the face's 5 (or 68) landmarks in image pixels.
        cfg: the model's `pretrained_cfg`, for its template and input size.

    Returns:
        The aligned RGB crop. Pixels outside the image are black, as in the ArcFace/face.evoLVe crops.
    """
    template, (h, w) = template_from_cfg(cfg)
    image = _to_pil_rgb(image)
    m = estimate_similarity(to_five_points(landmarks), template)
    k = int(_reduce_factor(m))
    if k > 1:
        # box-average first so bicubic sees at most 2 source pixels per crop pixel (no aliasing)
        image = image.reduce(k)
        m = m @ np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]])
    inv = _invert(m)
    # Pillow samples output pixel (x, y) at continuous (x + .5, y + .5) and reads input pixel i at i + .5; shift the
    # index-space transform into that convention
    c = inv[:, 2] + 0.5 - inv[:, :2] @ np.array([0.5, 0.5])
    coeffs = (inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1])
    return image.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC, fillcolor=0)


def align_faces(
        images: torch.Tensor,
        landmarks: ArrayLike,
        image_index: Optional[ArrayLike] = None,
        cfg: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Warp many faces from a batch of images onto the template, on the images' device.

    Args:
        images: (B, C, H, W) or (C, H, W) float images (any range; uint8 is converted to [0, 1]).
        landmarks: (N, 5, 2) (or (N, 68, 2)) landmarks, one set per face, in image pixels.
        image_index: (N,) index into `images` of each face; all zeros when omitted.
        cfg: the model's `pretrained_cfg`, for its template and input size.

    Returns:
        (N, C, h, w) aligned crops, values clamped to the input range of [0, 1] (uint8 or [0, 1] input).
    """
    if images.ndim == 3:
        images = images[None]
    if images.dtype == torch.uint8:
        images = images.float() / 255.
    template, (h, w) = template_from_cfg(cfg)
    pts = to_five_points(landmarks)
    if pts.ndim == 2:
        pts = pts[None]
    n = pts.shape[0]
    index = np.zeros(n, dtype=int) if image_index is None else np.asarray(image_index, dtype=int).reshape(n)
    out = images.new_zeros((n, images.shape[1], h, w))
    if n == 0:
        return out
    m = estimate_similarity(pts, template)
    factors = _reduce_factor(m)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij')
    dst = np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)], 0)  # (3, h*w) crop pixel indices
    for k in np.unique(factors):
        sel = np.nonzero(factors == k)[0]
        mk = m[sel]
        src_images = images
        if k > 1:
            # same box pre-filter as align_face; pixel i of the reduced image is centred on k*i + (k-1)/2
            src_images = F.avg_pool2d(images, int(k), ceil_mode=True, count_include_pad=False)
            mk = mk @ np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]])
        hs, ws = src_images.shape[-2:]
        src = _invert(mk) @ dst  # (n_k, 2, h*w) source pixel indices
        # grid_sample (align_corners=False) addresses pixel i at (2i + 1) / size - 1
        grid = np.stack([(2 * src[:, 0] + 1) / ws - 1, (2 * src[:, 1] + 1) / hs - 1], -1).reshape(len(sel), h, w, 2)
        grid_t = torch.as_tensor(grid, dtype=images.dtype, device=images.device)
        idx = torch.as_tensor(index[sel], device=images.device)
        crops = F.grid_sample(src_images[idx], grid_t, mode='bicubic', padding_mode='zeros', align_corners=False)
        out[torch.as_tensor(sel, device=images.device)] = crops
    return out.clamp_(0., 1.)


def alignment_score(crops: torch.Tensor) -> torch.Tensor:
    """Landmark-free score of how much (N, C, H, W) crops look like template-aligned faces (higher: more so).

    An aligned face is centred on the vertical mid-line, so the crop matches its mirror image: the score is the
    Pearson correlation of the grey crop's central region with its horizontal flip, after removing the coarse
    shading (a 1/4-size box blur) so lighting gradients do not count as symmetry. Aligned faces score about 0.5
    and more; faces shifted by a tenth of the crop, rotated by 20 degrees or framed loosely score well below.
    """
    grey = crops.float().mean(1, keepdim=True)
    h, w = grey.shape[-2:]
    k = max(3, (min(h, w) // 4) | 1)
    detail = grey - F.avg_pool2d(F.pad(grey, (k // 2,) * 4, mode='replicate'), k, stride=1)
    # rows from the brows to below the mouth, the columns the template's points span, as fractions of the crop
    region = detail[..., int(0.3 * h):int(0.9 * h), int(0.2 * w):w - int(0.2 * w)]
    a = region.flatten(1)
    b = region.flip(-1).flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def looks_aligned(crops: torch.Tensor, threshold: float = 0.35) -> bool:
    """True when the median `alignment_score` of a batch of crops reaches `threshold`."""
    if crops.shape[0] == 0:
        return True
    return bool(alignment_score(crops).median() >= threshold)
