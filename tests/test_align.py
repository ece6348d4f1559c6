"""Alignment: the similarity fit, both warps, the template from the config, the landmark-free alignment check."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from aucvt_zoo.align import (
    ARCFACE_TEMPLATE, align_face, align_faces, alignment_score, estimate_similarity, looks_aligned,
    template_from_cfg, to_five_points, transform_points)


def similarity(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([rot, np.asarray(shift, float)[:, None]], 1)


def draw_face(landmarks, size=(256, 256), background=(90, 110, 140)) -> Image.Image:
    """A cartoon face whose eye centres, nose tip and mouth corners are the 5 `landmarks` (x, y).

    MTCNN finds it (eyes, brows, nose and mouth are where a face has them), so detector tests need no photo.
    """
    lm = np.asarray(landmarks, float)
    img = Image.new('RGB', size, background)
    d = ImageDraw.Draw(img)
    eyes, mouth = lm[:2].mean(0), lm[3:].mean(0)
    iod = float(np.linalg.norm(lm[1] - lm[0]))
    cx, cy = eyes[0], (eyes[1] + mouth[1]) / 2
    d.ellipse([cx - 1.05 * iod, cy - 1.45 * iod, cx + 1.05 * iod, cy + 1.35 * iod], fill=(224, 182, 150))
    r = 0.16 * iod
    for x, y in lm[:2]:
        d.ellipse([x - 2 * r, y - r, x + 2 * r, y + r], fill=(245, 245, 245))
        d.ellipse([x - r, y - r, x + r, y + r], fill=(60, 40, 30))
        d.line([x - 2.2 * r, y - 2.5 * r, x + 2.2 * r, y - 2.8 * r], fill=(80, 50, 30), width=max(1, int(r * 0.8)))
    nx, ny = lm[2]
    d.polygon([(nx, ny - 2.7 * r), (nx - 1.2 * r, ny + 0.2 * r), (nx + 1.2 * r, ny + 0.2 * r)], fill=(200, 150, 120))
    d.line([tuple(lm[3]), tuple((lm[3] + lm[4]) / 2 + [0, 0.4 * r]), tuple(lm[4])], fill=(170, 60, 60),
           width=max(2, int(r)))
    return img.filter(ImageFilter.GaussianBlur(float(max(0.5, iod / 40))))


def disc_centroids(grey: np.ndarray, points: np.ndarray, radius: int = 7) -> np.ndarray:
    """Intensity centroid of the bright blob around each point."""
    out = []
    for x, y in points:
        x0, y0 = int(round(x)), int(round(y))
        ys, xs = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        w = grey[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1].astype(np.float64)
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


@pytest.mark.parametrize('angle,scale,shift', [(0, 1, (0, 0)), (25, 3.1, (140, 77)), (-40, 0.45, (-3, 9.5)),
                                               (170, 7.0, (500, 20))])
def test_known_similarity_comes_back_onto_template(angle, scale, shift):
    src = transform_points(similarity(angle, scale, shift), ARCFACE_TEMPLATE)
    m = estimate_similarity(src, ARCFACE_TEMPLATE)
    assert np.abs(transform_points(m, src) - ARCFACE_TEMPLATE).max() < 0.5
    # the fit is the exact inverse: scale 1/scale
    assert np.sqrt(abs(np.linalg.det(m[:, :2]))) == pytest.approx(1 / scale, rel=1e-6)


def test_noisy_landmarks_fit_within_half_pixel_on_average():
    rng = np.random.default_rng(0)
    src = transform_points(similarity(12, 2.0, (30, 40)), ARCFACE_TEMPLATE) + rng.normal(0, 0.3, (5, 2))
    m = estimate_similarity(src, ARCFACE_TEMPLATE)
    assert np.linalg.norm(transform_points(m, src) - ARCFACE_TEMPLATE, axis=1).mean() < 0.5


def test_reflection_is_never_returned():
    mirrored = ARCFACE_TEMPLATE * [-1, 1] + [112, 0]  # left-right flipped point order
    m = estimate_similarity(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(m[:, :2]) > 0


def test_batch_and_single_estimates_agree():
    mats = [similarity(a, s, t) for a, s, t in [(5, 1.2, (3, 4)), (-30, 2.5, (100, 50)), (90, 0.7, (10, -20))]]
    src = np.stack([transform_points(m, ARCFACE_TEMPLATE) for m in mats])
    batch = estimate_similarity(src, ARCFACE_TEMPLATE)
    assert batch.shape == (3, 2, 3)
    for b, s in zip(batch, src):
        np.testing.assert_allclose(b, estimate_similarity(s, ARCFACE_TEMPLATE), atol=1e-9)


@pytest.mark.parametrize('angle,scale', [(0, 2.5), (20, 2.5), (-15, 5.0)])
def test_warp_puts_drawn_landmarks_on_template_in_both_paths(angle, scale):
    src = transform_points(similarity(angle, scale, (300, 180)), ARCFACE_TEMPLATE)
    img = Image.new('L', (900, 800))
    d = ImageDraw.Draw(img)
    r = 3 * scale  # discs of radius 3 px in the crop
    for x, y in src:
        d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    rgb = img.convert('RGB')
    crop_pil = np.asarray(align_face(rgb, src))[..., 0]
    crop_torch = align_faces(torch.from_numpy(np.array(rgb)).permute(2, 0, 1), src[None])[0, 0].numpy() * 255
    for crop in (crop_pil, crop_torch):
        assert np.abs(disc_centroids(crop, ARCFACE_TEMPLATE) - ARCFACE_TEMPLATE).max() < 0.6
    # single (Pillow) and batch (torch) warps are the same image up to interpolation rounding
    assert np.abs(crop_pil.astype(np.float64) - crop_torch).mean() < 1.0


def test_batch_warp_takes_each_face_from_its_own_image():
    faces = [transform_points(similarity(a, 1.5, (40, 30)), ARCFACE_TEMPLATE) for a in (0, 10)]
    images = np.stack([np.array(draw_face(f)) for f in faces])
    batch = align_faces(torch.from_numpy(images).permute(0, 3, 1, 2), np.stack(faces[::-1]), image_index=[1, 0])
    for crop, image, lm in zip(batch, images[::-1], faces[::-1]):
        single = np.asarray(align_face(image, lm), dtype=np.float64) / 255
        assert np.abs(crop.permute(1, 2, 0).numpy() - single).mean() < 0.01


def test_template_from_config():
    template, size = template_from_cfg(None)
    assert size == (112, 112) and np.array_equal(template, ARCFACE_TEMPLATE)
    template, size = template_from_cfg({'input_size': (3, 224, 224)})
    assert size == (224, 224)
    np.testing.assert_allclose(template, ARCFACE_TEMPLATE * 2)
    own = ARCFACE_TEMPLATE + [0, 8]
    template, size = template_from_cfg({'input_size': (3, 128, 112), 'face_template': own.tolist()})
    assert size == (128, 112) and np.array_equal(template, own)
    with pytest.raises(ValueError, match='face_template'):
        template_from_cfg({'face_template': [[1, 2]] * 4})


def test_model_template_is_used_by_the_warp():
    lm = transform_points(similarity(0, 2, (50, 50)), ARCFACE_TEMPLATE)
    cfg = {'input_size': (3, 224, 224)}
    img = Image.new('L', (500, 500))
    d = ImageDraw.Draw(img)
    for x, y in lm:
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=255)
    crop = align_face(img.convert('RGB'), lm, cfg)
    assert crop.size == (224, 224)
    # at scale 1 the discs keep Pillow's whole-pixel rasterisation, hence 1 px (a wrong template is off by tens)
    assert np.abs(disc_centroids(np.asarray(crop)[..., 0], ARCFACE_TEMPLATE * 2) - ARCFACE_TEMPLATE * 2).max() < 1.0


def test_68_points_reduce_to_eye_centres_nose_and_mouth_corners():
    pts = np.zeros((68, 2))
    pts[36:42] = [10, 20]
    pts[42:48] = [30, 20]
    pts[30], pts[48], pts[54] = [20, 30], [12, 40], [28, 40]
    np.testing.assert_allclose(to_five_points(pts), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    with pytest.raises(ValueError, match='68-point'):
        to_five_points(np.zeros((7, 2)))


def test_alignment_score_separates_aligned_from_shifted_and_rotated_faces():
    lm = transform_points(similarity(0, 2.0, (60, 40)), ARCFACE_TEMPLATE)
    image = torch.from_numpy(np.array(draw_face(lm, size=(400, 400)))).permute(2, 0, 1)
    iod = np.linalg.norm(lm[1] - lm[0])
    centre = lm.mean(0)
    rotated = transform_points(similarity(20, 1, (0, 0)), lm - centre) + centre
    crops = align_faces(image, np.stack([lm, lm + [0.3 * iod, 0], rotated]))
    aligned, shifted, tilted = alignment_score(crops).tolist()
    assert aligned > 0.35 > max(shifted, tilted)
    assert looks_aligned(crops[:1]) and not looks_aligned(crops[1:])
