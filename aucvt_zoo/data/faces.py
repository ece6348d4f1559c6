"""Built-in data: procedural faces driven by Facial Action Units (FACS), in a "synthetic" and a "real" style.

A stand-in for LSD (ABAW4 Learning from Synthetic Data), so the paper's synthetic-to-real question can be asked on
any CPU without licences or downloads. It is not LSD and not a model of real faces: it is a cartoon whose every
muscle movement is one FACS Action Unit, drawn with Pillow polygons in the aligned 112x112 frame the zoo's models
read (eyes near (38, 52) and (74, 52), nose tip (56, 72), mouth corners (41, 92) and (71, 92)), so the AU region
boxes of `aucvt_zoo.labels.REGION_LAYOUTS` fall on the features they are meant to read.

Pieces, top to bottom:
- labels: `PROTOTYPES` (the EMFACS prototype of each expression), `sample_labels` (random intensities, dropped and
  spurious AUs, expression-label noise) and `au_presence` (the one AU presence threshold of the zoo's faces).
- identities: `Identity` and `sample_identity` (face shape, skin, hair, brows, eye spacing, lips, pose jitter),
  with a different distribution per style.
- renderer: `render(aus, identity, style, size, seed)` -> (RGB image, 5 landmarks).
- dataset: `FacsFaces`, deterministic per (seed, style, index).
The exporter that writes splits in the LSD / OpenFace-CSV / RAF-AU formats is `aucvt_zoo.data.faces_export`.
"""
import functools
import io
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, JpegImagePlugin

import torch
from torch.utils.data import Dataset

from ..labels import AU_SETS, EXPRESSIONS, au_name, resolve_aus

__all__ = [
    'STYLES', 'LANDMARK_TEMPLATE', 'RENDERED_AUS', 'PROTOTYPES', 'PROTOTYPE_SOURCE', 'AU_PRESENCE_THRESHOLD',
    'PROTOTYPE_DROP_RATE', 'PROTOTYPE_INTENSITY', 'SPURIOUS_RATE', 'SPURIOUS_INTENSITY',
    'FaceLabels', 'Identity', 'au_presence', 'sample_labels', 'sample_identity', 'render', 'FacsFaces',
]

STYLES: Tuple[str, ...] = ('synthetic', 'real')

# The 5-point layout of the aligned 112x112 face (the ArcFace / face.evoLVe template, rounded): eye centres, nose
# tip, mouth corners, image-left first. The renderer draws a neutral face with these landmarks before pose jitter.
LANDMARK_TEMPLATE = np.array([[38.0, 52.0], [74.0, 52.0], [56.0, 72.0], [41.0, 92.0], [71.0, 92.0]], np.float32)

# Every AU of rafau21 (a superset of openface16) changes the drawing; see docs/faces.md for what each one moves.
RENDERED_AUS: Tuple[str, ...] = AU_SETS['rafau21']

# Expression -> AU prototype, after EMFACS (Friesen & Ekman 1983) as commonly tabulated (e.g. the emotion table of
# the Wikipedia article "Facial Action Coding System"; intensity letters and the contempt row left out).
PROTOTYPE_SOURCE = 'EMFACS (Friesen & Ekman, 1983), as commonly tabulated'
PROTOTYPES: Dict[str, Tuple[str, ...]] = {
    'anger': ('AU4', 'AU5', 'AU7', 'AU23'),
    'disgust': ('AU9', 'AU15', 'AU16'),
    'fear': ('AU1', 'AU2', 'AU4', 'AU5', 'AU7', 'AU20', 'AU26'),
    'happiness': ('AU6', 'AU12'),
    'sadness': ('AU1', 'AU4', 'AU15'),
    'surprise': ('AU1', 'AU2', 'AU5', 'AU26'),
}

# Intensities are 0..1 (FACS A..E is roughly 0.2..1). An AU counts as present at or above this threshold, for
# every consumer (dataset targets, exported CSVs, RAF-AU label lines): trace movements below it are drawn but
# not labelled, as a human coder would skip them.
AU_PRESENCE_THRESHOLD = 0.25
# Each prototype AU is dropped with this probability (at least one is always kept), and drawn with a uniform
# intensity in PROTOTYPE_INTENSITY; every other rendered AU appears with SPURIOUS_RATE at SPURIOUS_INTENSITY. So AUs
# inform the expression without determining it.
PROTOTYPE_DROP_RATE = 0.15
PROTOTYPE_INTENSITY = (0.35, 1.0)
SPURIOUS_RATE = 0.04
SPURIOUS_INTENSITY = (0.15, 0.7)

# Independent random streams per (seed, style, index): labels never depend on the image, so they can be sampled
# without rendering, and changing one stream's use never shifts another.
_STREAM_LABELS, _STREAM_IDENTITY, _STREAM_STYLE = 0, 1, 2
# Drawing happens on a canvas this many times larger, then a box filter reduces it: cheap anti-aliasing.
_SUPERSAMPLE = 2
_CX = 56.0  # face midline in the 112 frame

Color = Tuple[int, int, int]


def _rng(seed: int, style: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(STYLES.index(style), index, stream)))


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f'Unknown face style {style!r}; use one of {", ".join(STYLES)}.')
    return style


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
    return int(seed)


# ----------------------------------------------------------------------------------------------------------- labels
def au_presence(intensities: Union[Mapping[str, float], np.ndarray, torch.Tensor, float]):
    """Whether each AU is present: intensity >= AU_PRESENCE_THRESHOLD. The one threshold every consumer uses.

    Args:
        intensities: a dict AU -> intensity (returns a dict AU -> bool), or an array / tensor / number.
    """
    if isinstance(intensities, Mapping):
        return {au: bool(v >= AU_PRESENCE_THRESHOLD) for au, v in intensities.items()}
    return intensities >= AU_PRESENCE_THRESHOLD


@dataclass(frozen=True)
class FaceLabels:
    """The labels of one face.

    Attributes:
        expression: index (in aucvt_zoo.labels.EXPRESSIONS) of the expression whose prototype the AUs came from.
        label: the expression label the sample carries; differs from `expression` where label noise struck.
        intensities: AU name -> intensity in (0, 1] of every AU drawn; absent AUs are left out.
    """
    expression: int
    label: int
    intensities: Dict[str, float]

    def present(self) -> Tuple[str, ...]:
        """The AUs at or above the presence threshold (`au_presence`), in rafau21 order."""
        return tuple(au for au, p in zip(RENDERED_AUS, self.targets(RENDERED_AUS)) if p)

    def targets(self, au_names: Sequence[str]) -> np.ndarray:
        """0/1 presence (`au_presence`) of each AU of `au_names` (canonical names), float32, in that order."""
        return au_presence(np.array([self.intensities.get(au, 0.0) for au in au_names], np.float64)).astype(np.float32)


def sample_labels(index: int, seed: int = 0, style: str = 'synthetic', label_noise: float = 0.0) -> FaceLabels:
    """The expression, its AU intensities and its (possibly noisy) label of sample `index`, without rendering.

    The expression is uniform over the 6; each prototype AU (PROTOTYPES) is dropped with PROTOTYPE_DROP_RATE
    (at least one stays) and otherwise gets an intensity uniform in PROTOTYPE_INTENSITY; each other rendered AU
    appears with SPURIOUS_RATE at an intensity uniform in SPURIOUS_INTENSITY. With probability `label_noise` the
    label is replaced by one of the 5 other expressions, uniformly.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f'label_noise is a probability in [0, 1], got {label_noise!r}.')
    rng = _rng(_check_seed(seed), _check_style(style), index, _STREAM_LABELS)
    expression = int(rng.integers(len(EXPRESSIONS)))
    prototype = PROTOTYPES[EXPRESSIONS[expression]]
    keep = rng.random(len(prototype)) >= PROTOTYPE_DROP_RATE
    rescue = int(rng.integers(len(prototype)))
    if not keep.any():
        keep[rescue] = True
    values = rng.uniform(*PROTOTYPE_INTENSITY, size=len(prototype))
    intensities = {au: float(v) for au, v, k in zip(prototype, values, keep) if k}
    others = [au for au in RENDERED_AUS if au not in prototype]
    spurious = rng.random(len(others)) < SPURIOUS_RATE
    spurious_values = rng.uniform(*SPURIOUS_INTENSITY, size=len(others))
    intensities.update({au: float(v) for au, s, v in zip(others, spurious, spurious_values) if s})
    # Both draws always happen, so the noise rate changes labels only, never anything else of the sample.
    flip, offset = rng.random(), int(rng.integers(1, len(EXPRESSIONS)))
    label = (expression + offset) % len(EXPRESSIONS) if flip < label_noise else expression
    return FaceLabels(expression, label, intensities)


# ------------------------------------------------------------------------------------------------------- identities
@dataclass(frozen=True)
class Identity:
    """What makes one rendered person look like themself. Lengths are pixels of the 112 frame.

    `rotation` (degrees), `scale` and `shift` are pose jitter (alignment noise): they move every drawn point,
    the returned landmarks included. `dataclasses.replace(identity, rotation=0.0, scale=1.0, shift=(0.0, 0.0))`
    gives the same person exactly aligned.
    """
    face_width: float       # half-width at the cheekbones
    chin_y: float           # lowest point of the jaw line at rest
    forehead_y: float       # top of the skull
    jaw: float              # jaw-line exponent: ~1.6 pointed, ~3 square
    chin_width: float       # half-width of the flat of the chin
    skin: Color
    blush: float            # resting cheek redness, 0..1
    hair: Color
    hair_style: int         # 0 short, 1 long, 2 fringe, 3 bald
    hairline: float         # forehead hairline height at the midline
    hair_part: float        # -1..1, tilts the hairline
    brow_thickness: float
    brow_color: Color
    brow_height: float      # offset of the brows, + is lower
    eye_spacing: float      # distance between the eye centres
    eye_size: float         # scale of the eye opening and width
    eye_tilt: float         # outer corner above inner corner
    iris: Color
    nose_width: float       # half-width of the nostril wings
    mouth_width: float      # half-width of the mouth at rest
    lip_fullness: float     # scale of lip thickness
    lip_color: Color
    background: Color
    background2: Color      # second background colour ("real" uses a gradient)
    clothes: Color
    rotation: float
    scale: float
    shift: Tuple[float, float]

    def aligned(self) -> 'Identity':
        """The same person without pose jitter (landmarks exactly on the aligned template)."""
        return replace(self, rotation=0.0, scale=1.0, shift=(0.0, 0.0))


# The two styles draw identities from different distributions, one more way the "real" validation set is out of
# the "synthetic" training distribution (as LSD's real faces are for its rendered ones).
_SKIN = {
    'synthetic': ((247, 214, 189), (238, 196, 160), (224, 172, 138), (198, 140, 104), (156, 104, 72),
                  (255, 224, 200), (232, 190, 172)),
    'real': ((236, 200, 178), (214, 170, 140), (190, 140, 108), (160, 112, 82), (120, 82, 60), (92, 62, 46),
             (222, 184, 160), (200, 160, 130)),
}
_HAIR = {
    'synthetic': ((40, 30, 25), (110, 70, 40), (200, 160, 90), (150, 60, 30), (25, 25, 30), (170, 120, 70)),
    'real': ((30, 26, 24), (70, 50, 38), (120, 95, 70), (160, 150, 140), (55, 40, 30), (180, 150, 105)),
}
_IRIS = ((70, 45, 30), (40, 90, 140), (90, 110, 60), (110, 80, 50), (30, 25, 20))
_BACKGROUND = {
    'synthetic': ((200, 220, 240), (230, 230, 230), (210, 235, 215), (240, 225, 200), (225, 210, 235),
                  (190, 200, 210)),
    'real': ((90, 85, 80), (140, 130, 115), (60, 70, 85), (170, 165, 150), (110, 120, 100), (45, 45, 50),
             (150, 110, 90)),
}
_CLOTHES = ((40, 60, 120), (150, 40, 40), (60, 60, 60), (220, 220, 220), (40, 110, 70), (200, 150, 60))


def sample_identity(rng: Union[np.random.Generator, int], style: str = 'synthetic') -> Identity:
    """Draw a random identity of `style` from a numpy Generator (or an int seed)."""
    _check_style(style)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(_check_seed(rng))
    real = style == 'real'
    # Two vector draws, consumed in a fixed order: scalar Generator calls cost more than the rest of this function.
    uniforms = iter(rng.random(32).tolist())
    normals = iter(rng.standard_normal(16).tolist())

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * next(uniforms)

    def pick(palette: Sequence) -> Color:
        return tuple(palette[min(int(next(uniforms) * len(palette)), len(palette) - 1)])

    def jitter(color: Color, amount: float) -> Color:
        return tuple(int(min(max(c + amount * next(normals), 0.0), 255.0)) for c in color)

    def clipped_normal(sigma: float, limit: float) -> float:
        return min(max(sigma * next(normals), -limit), limit)

    style_p = (0.4, 0.7, 0.9) if real else (0.35, 0.7, 0.95)  # cumulative: short, long, fringe (rest bald)
    hair_draw = next(uniforms)
    brow_base, brow_shade = pick(_HAIR[style]), u(0.7, 1.0)
    return Identity(
        face_width=u(38.0, 45.0) if real else u(37.0, 42.0),
        chin_y=u(104.0, 112.0) if real else u(104.0, 109.0),
        forehead_y=u(2.0, 8.0),
        jaw=u(1.6, 3.2),
        chin_width=u(6.0, 13.0),
        skin=jitter(pick(_SKIN[style]), 6.0 if real else 3.0),
        blush=u(0.0, 0.25) if real else u(0.1, 0.35),
        hair=jitter(pick(_HAIR[style]), 8.0),
        hair_style=sum(hair_draw >= p for p in style_p),
        hairline=u(16.0, 27.0),
        hair_part=u(-1.0, 1.0),
        brow_thickness=u(1.6, 3.6),
        brow_color=tuple(int(c * brow_shade) for c in brow_base),
        brow_height=u(-1.5, 1.5),
        eye_spacing=u(33.0, 39.0),
        eye_size=u(0.88, 1.12),
        eye_tilt=u(-0.5, 1.5),
        iris=pick(_IRIS),
        nose_width=u(6.0, 9.0),
        mouth_width=u(13.5, 16.5),
        lip_fullness=u(0.75, 1.3),
        lip_color=jitter((178, 90, 92) if real else (205, 95, 105), 12.0),
        background=pick(_BACKGROUND[style]),
        background2=pick(_BACKGROUND[style]),
        clothes=jitter(pick(_CLOTHES), 10.0),
        rotation=clipped_normal(4.0 if real else 2.0, 10.0),
        scale=u(0.93, 1.07) if real else u(0.97, 1.03),
        shift=(clipped_normal(2.0 if real else 1.0, 5.0), clipped_normal(2.0 if real else 1.0, 5.0)),
    )


# --------------------------------------------------------------------------------------------------------- geometry
def _mix(a: Color, b: Color, t: float) -> Color:
    t = min(max(t, 0.0), 1.0)
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


def _shade(c: Color, f: float) -> Color:
    return (min(int(c[0] * f), 255), min(int(c[1] * f), 255), min(int(c[2] * f), 255))


@functools.lru_cache(maxsize=None)
def _lin(start: float, stop: float, n: int) -> np.ndarray:
    """np.linspace, cached: the renderer asks for the same few parameter ramps thousands of times a second."""
    out = np.linspace(start, stop, n)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=None)
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    out = np.stack([np.cos(t), np.sin(t)], 1)
    out.flags.writeable = False
    return out


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> np.ndarray:
    return _unit_circle(n) * (rx, ry) + (cx, cy)


def _pts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 2) points from x and y arrays (np.stack's generality costs more than the drawing here)."""
    out = np.empty((len(x), 2))
    out[:, 0] = x
    out[:, 1] = y
    return out


def _quad(p0, p1, p2, n: int = 9) -> np.ndarray:
    """Quadratic curve from p0 to p2 passing through p1 at its middle."""
    p0, p1, p2 = np.asarray(p0, float), np.asarray(p1, float), np.asarray(p2, float)
    ctrl = 2.0 * p1 - 0.5 * (p0 + p2)
    t = _lin(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2


class _Canvas:
    """Collects polygons and lines in the 112 frame, then maps all their points through the pose transform at once
    and draws them in order on a supersampled Pillow canvas (one matrix product instead of one per shape)."""

    def __init__(self, unit: float):
        self.unit = unit      # canvas pixels per 112-frame pixel
        self.invisible: Optional[Color] = None  # lines of this colour (a wrinkle at depth 0: skin) are skipped
        self.shapes: list = []  # (is_polygon, number of points, fill, line width in canvas pixels)
        self.points: list = []

    def polygon(self, pts: np.ndarray, fill: Color) -> None:
        self.shapes.append((True, len(pts), fill, 0))
        self.points.append(pts)

    def line(self, pts: np.ndarray, fill: Color, width: float) -> None:
        if fill == self.invisible:
            return
        self.shapes.append((False, len(pts), fill, max(1, int(round(width * self.unit)))))
        self.points.append(pts)

    def render(self, image: Image.Image, matrix: np.ndarray) -> None:
        """Draw everything collected onto `image`, through the 2x3 affine `matrix` (112 frame -> canvas pixels)."""
        flat = (np.concatenate(self.points) @ matrix[:, :2].T + matrix[:, 2]).ravel().tolist()
        draw = ImageDraw.Draw(image)
        start = 0
        for is_polygon, n, fill, width in self.shapes:
            xy = flat[start:start + 2 * n]
            start += 2 * n
            if is_polygon:
                draw.polygon(xy, fill=fill)
            else:
                draw.line(xy, fill=fill, width=width)


def _au_reader(aus: Mapping[Union[str, int], float]) -> Callable[[str], float]:
    values = {}
    for key, value in aus.items():
        name = au_name(key)
        if name not in RENDERED_AUS:
            raise ValueError(f'{name} is not rendered by the built-in faces; rendered AUs: {", ".join(RENDERED_AUS)}.')
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f'Intensity of {name} must be in [0, 1], got {value!r}.')
        values[name] = value
    return lambda name: values.get(name, 0.0)


def _draw_face(canvas: _Canvas, a: Callable[[str], float], idt: Identity) -> Dict[str, np.ndarray]:
    """Draw one face in the 112 frame; returns the named key points it drew (112 frame, before pose)."""
    geo: Dict[str, np.ndarray] = {}
    skin = idt.skin
    canvas.invisible = skin
    crease = _shade(skin, 0.78)   # wrinkles and folds: skin in shadow

    def fold(t: float) -> Color:  # a wrinkle whose depth grows with an AU intensity
        return _mix(skin, crease, t)

    # ---- back hair, shoulders, ears, face outline
    W = idt.face_width
    chin_y = idt.chin_y + 7.0 * a('AU26') + 11.0 * a('AU27') - 1.2 * a('AU17')
    widest = 62.0
    if idt.hair_style == 1:  # long hair falls behind the face to the shoulders
        arc = _lin(np.pi, 2.0 * np.pi, 13)
        crown = _pts(_CX + (W + 8.0) * np.cos(arc), 50.0 + 48.0 * np.sin(arc))
        canvas.polygon(np.concatenate([crown, [[_CX + W + 10.0, 120.0], [_CX - W - 10.0, 120.0]]]), idt.hair)
    canvas.polygon(np.array([[_CX - 0.55 * W, 86.0], [_CX + 0.55 * W, 86.0], [_CX + 0.6 * W, 125.0],
                             [_CX - 0.6 * W, 125.0]]), _shade(skin, 0.85))
    canvas.polygon(_ellipse(_CX, 142.0, W + 34.0, 36.0, 24), idt.clothes)
    for s in (-1.0, 1.0):
        canvas.polygon(_ellipse(_CX + s * (W + 0.5), 66.0, 5.0, 9.0, 14), _shade(skin, 0.93))
    theta = _lin(np.pi, 0.0, 15)
    upper = _pts(_CX + W * np.cos(theta), widest - (widest - idt.forehead_y) * np.sin(theta))
    u = _lin(0.0, 1.0, 12)[1:]
    hw = idt.chin_width + (W - idt.chin_width) * (1.0 - u ** idt.jaw) ** (1.0 / idt.jaw)
    ys = widest + (chin_y - widest) * u
    right_jaw = _pts(_CX + hw, ys)
    chin = _quad((_CX + idt.chin_width, chin_y), (_CX, chin_y + 2.5), (_CX - idt.chin_width, chin_y), 7)[1:-1]
    left_jaw = _pts(_CX - hw, ys)[::-1]
    canvas.polygon(np.concatenate([upper, right_jaw, chin, left_jaw]), skin)
    geo['chin'] = np.array([_CX, chin_y + 2.5])

    # ---- hair over the forehead
    if idt.hair_style != 3:
        # the hair is the part of a head ellipse (a little larger than the face) above the hairline; the hairline
        # runs from temple to temple, so the cap's arc is cut where the ellipse meets the temples' height
        rx, ry = W + 2.5, widest - idt.forehead_y + 3.0
        fringe = idt.hair_style == 2
        depth = 8.0 if fringe else 15.0
        center_y = idt.hairline + (6.0 if fringe else 0.0)
        ends = {s: center_y + depth + 3.0 * idt.hair_part * s for s in (-1.0, 1.0)}
        th = {s: math.asin(min(max((widest - ends[s]) / ry, -1.0), 1.0)) for s in (-1.0, 1.0)}
        arc = np.linspace(np.pi - th[-1.0], th[1.0], 17)
        cap = _pts(_CX + rx * np.cos(arc), widest - ry * np.sin(arc))
        xs = np.linspace(cap[-1, 0], cap[0, 0], 13)
        rel = (xs - _CX) / rx
        line_y = center_y + depth * np.abs(rel) ** (1.2 if fringe else 2.0) + 3.0 * idt.hair_part * rel
        canvas.polygon(np.concatenate([cap, _pts(xs, line_y)[1:-1]]), idt.hair)

    # ---- cheeks (AU6 raises them: the apple moves up and fills out)
    ex = {s: _CX + s * idt.eye_spacing / 2.0 for s in (-1.0, 1.0)}
    for s, side in ((-1.0, 'left'), (1.0, 'right')):
        cy = 70.0 - 5.0 * a('AU6')
        color = _mix(skin, (225, 95, 95), idt.blush * 0.35 + 0.3 * a('AU6'))
        canvas.polygon(_ellipse(ex[s] + s * 2.0, cy, 8.0 + 1.5 * a('AU6'), 5.5 + 1.0 * a('AU6'), 16), color)
        geo[f'cheek_{side}'] = np.array([ex[s] + s * 2.0, cy])

    # ---- mouth geometry first: the nasolabial folds end at the lip corners
    mw = idt.mouth_width
    out = (3.0 * a('AU12') + 4.5 * a('AU20') - 1.0 * a('AU15') - 1.2 * a('AU14') - 1.5 * a('AU23')
           - 1.0 * a('AU24') - 5.0 * a('AU18') - 4.5 * a('AU22') - 1.0 * a('AU26') - 2.5 * a('AU27') - 0.5 * a('AU17'))
    down = (-5.0 * a('AU12') + 4.0 * a('AU15') + 0.8 * a('AU20') - 0.8 * a('AU14') - 1.2 * a('AU10')
            + 1.0 * a('AU16') + 1.8 * a('AU26') + 3.0 * a('AU27') + 0.6 * a('AU17'))
    half = mw + out
    corner_y = 92.0 + down
    mouth_center = 92.0 - 2.0 * a('AU17') + 0.5 * a('AU15')  # the chin boss pushes the lower lip up: an inverted U
    gap = 2.5 * a('AU25') + 7.5 * a('AU26') + 12.0 * a('AU27') + 2.0 * a('AU22')
    upper_in_c = mouth_center - 0.3 * gap - 2.8 * a('AU10')
    lower_in_c = max(mouth_center + 0.7 * gap + 2.8 * a('AU16'), upper_in_c)

    # ---- nose (AU9 raises and widens the wings and wrinkles the bridge)
    nw = idt.nose_width + 1.2 * a('AU9')
    ala_y = 69.0 - 1.8 * a('AU9') - 0.6 * a('AU10')
    for s, side in ((-1.0, 'left'), (1.0, 'right')):
        # nasolabial fold: from the nostril wing to just outside the lip corner, deepened by AU9/10/12
        depth = 0.18 + 0.45 * a('AU12') + 0.4 * a('AU10') + 0.35 * a('AU9') + 0.15 * a('AU6')
        fold_pts = _quad((_CX + s * (nw + 1.5), ala_y + 0.5), (_CX + s * (nw + 6.0 + 1.5 * a('AU12')), 83.0),
                         (_CX + s * (half + 3.0), corner_y + 3.0), 8)
        canvas.line(fold_pts, fold(min(depth, 0.95)), 1.0)
    canvas.line(np.array([[_CX - 3.0, 53.0], [_CX - 4.5, 64.0], [_CX - nw + 2.0, ala_y - 2.0]]), fold(0.35), 1.2)
    for s, side in ((-1.0, 'left'), (1.0, 'right')):
        wing = np.array([[_CX + s * (nw - 1.5), ala_y - 4.0], [_CX + s * nw, ala_y],
                         [_CX + s * (nw - 1.0), ala_y + 3.0], [_CX + s * 4.0, ala_y + 3.8]])
        canvas.line(wing, fold(0.6), 1.0)
        nostril_y = 73.6 - 1.5 * a('AU9')
        canvas.polygon(_ellipse(_CX + s * 3.2, nostril_y, 1.9 + 0.3 * a('AU9'), 1.05, 10), _shade(skin, 0.45))
        geo[f'ala_{side}'] = np.array([_CX + s * nw, ala_y])
    geo['nose_tip'] = np.array([_CX, 72.0])
    for k in range(3 if a('AU9') > 0 else 0):  # nose wrinkles across the bridge
        y = 57.0 + 2.6 * k
        canvas.line(np.array([[_CX - 5.0, y + 1.0], [_CX, y], [_CX + 5.0, y + 1.0]]), fold(0.85 * a('AU9')), 0.8)

    # ---- eyes
    for s, side in ((-1.0, 'left'), (1.0, 'right')):
        cx_e, cy_e, ew = ex[s], 52.0, 8.0 * idt.eye_size
        up = idt.eye_size * (3.4 + 2.8 * a('AU5') - 0.9 * a('AU7') - 0.7 * a('AU6') - 0.6 * a('AU4') - 0.3 * a('AU9'))
        lo = idt.eye_size * (2.6 - 1.3 * a('AU6') - 1.3 * a('AU7') - 0.3 * a('AU9'))
        up, lo = max(up, 0.4), max(lo, 0.3)
        t = _lin(-1.0, 1.0, 11)
        x = cx_e + t * ew
        # the outer corner sits `eye_tilt` above the inner one
        base = cy_e + 0.3 - idt.eye_tilt * t * s / 2.0
        bump = 1.0 - t ** 2
        y_up = base - up * bump ** 0.7
        y_lo = base + lo * bump ** 0.9 * (1.0 - 0.3 * a('AU7'))
        canvas.polygon(np.concatenate([_pts(x, y_up), _pts(x, y_lo)[::-1][1:-1]]), (245, 243, 238))
        for r, color in ((3.3 * idt.eye_size, idt.iris), (1.5 * idt.eye_size, (15, 12, 12))):
            circle = _ellipse(cx_e, cy_e + 0.3, r, r, 16)
            circle[:, 1] = np.clip(circle[:, 1], np.interp(circle[:, 0], x, y_up), np.interp(circle[:, 0], x, y_lo))
            canvas.polygon(circle, color)
        if up > 1.6:
            canvas.polygon(_ellipse(cx_e + 1.0, cy_e - 0.9, 0.7, 0.7, 8), (250, 250, 250))
        canvas.line(_pts(x, y_up), (30, 22, 20), 1.2)
        canvas.line(_pts(x, y_lo)[1:-1], _shade(skin, 0.6), 0.6)
        crease_gap = 6.3 - up  # the lid fold disappears when AU5 retracts the lid up to it
        if crease_gap > 0.6:
            canvas.line(_pts(x[1:-1], (base - up * bump ** 0.7 - crease_gap * bump)[1:-1]),
                        fold(min(0.7, crease_gap / 3.0)), 0.7)
        if a('AU7') > 0:  # tightened lower lid bulges
            canvas.line(_pts(x[2:-2], (y_lo + 1.4)[2:-2]), fold(0.7 * a('AU7')), 0.7)
        if a('AU6') > 0:  # infraorbital furrow and crow's feet
            canvas.line(_pts(x[1:-1], (y_lo + 4.6 - 1.4 * a('AU6'))[1:-1] + 0.6 * bump[1:-1]),
                        fold(0.75 * a('AU6')), 0.8)
            corner = np.array([cx_e + s * (ew + 1.2), base[-1 if s > 0 else 0]])
            for ang in (-0.45, 0.0, 0.45):
                tip = corner + 4.5 * np.array([s * math.cos(ang), math.sin(ang)])
                canvas.line(np.stack([corner, tip]), fold(0.8 * a('AU6')), 0.6)
        geo[f'eye_{side}'] = np.array([cx_e, cy_e])
        geo[f'eye_{side}_top'] = np.array([cx_e, y_up[5]])
        geo[f'eye_{side}_bottom'] = np.array([cx_e, y_lo[5]])

    # ---- brows (AU1 inner up, AU2 outer up, AU4 down and together, AU9 inner down)
    for s, side in ((-1.0, 'left'), (1.0, 'right')):
        ew = 8.0 * idt.eye_size
        dy = idt.brow_height
        inner = np.array([ex[s] - s * 0.95 * ew - s * 2.5 * a('AU4'),
                          43.5 + dy - 5.5 * a('AU1') + 4.0 * a('AU4') + 2.0 * a('AU9')])
        peak = np.array([ex[s] + s * 0.25 * ew, 40.5 + dy - 2.0 * a('AU1') - 3.0 * a('AU2') + 2.5 * a('AU4')
                         + 1.0 * a('AU9') + 0.5 * a('AU6')])
        outer = np.array([ex[s] + s * 1.35 * ew, 42.5 + dy - 5.0 * a('AU2') + 1.5 * a('AU4') + 0.8 * a('AU6')])
        mid = _quad(inner, peak, outer, 9)
        th = idt.brow_thickness * _lin(1.1, 0.45, 9)
        canvas.polygon(np.concatenate([mid - _pts(0 * th, th / 2), (mid + _pts(0 * th, th / 2))[::-1]]),
                       idt.brow_color)
        geo[f'brow_{side}_inner'], geo[f'brow_{side}_peak'], geo[f'brow_{side}_outer'] = inner, peak, outer
    for s in ((-1.0, 1.0) if a('AU4') > 0 else ()):  # AU4: vertical furrows between the brows
        canvas.line(np.array([[_CX + s * 2.2, 44.0], [_CX + s * 2.8, 48.0], [_CX + s * 2.5, 51.0]]),
                    fold(0.85 * a('AU4')), 0.8)
    for k in range(2 if a('AU1') + a('AU2') > 0 else 0):  # forehead lines: AU1 in the middle, AU2 at the sides
        y = 33.0 + 3.4 * k + idt.brow_height
        xs = _lin(-11.0, 11.0, 7)
        canvas.line(_pts(_CX + xs, y - 1.6 * (1.0 - (xs / 11.0) ** 2)), fold(0.7 * a('AU1')), 0.7)
        for s in (-1.0, 1.0):
            xs2 = _lin(0.0, 11.0, 5)
            canvas.line(_pts(ex[s] + s * xs2, y + 0.8 + 0.05 * xs2 ** 1.5), fold(0.7 * a('AU2')), 0.7)

    # ---- mouth
    thin = ((1.0 - 0.55 * a('AU23')) * (1.0 - 0.6 * a('AU24')) * (1.0 - 0.25 * a('AU20')) * (1.0 - 0.15 * a('AU12'))
            * (1.0 + 0.35 * a('AU18') + 0.25 * a('AU22')))
    t_up = 3.6 * idt.lip_fullness * thin
    t_lo = 4.6 * idt.lip_fullness * thin + 0.8 * a('AU16') + 0.5 * a('AU17')
    t = _lin(-1.0, 1.0, 15)
    at = np.abs(t)
    xs = _CX + t * half
    p = 2.0 - 0.7 * max(a('AU22'), a('AU18'))  # funnel and pucker round the opening
    in_up = upper_in_c + (corner_y - upper_in_c) * at ** p
    in_lo = lower_in_c + (corner_y - lower_in_c) * at ** p
    out_up = in_up - t_up * (1.0 - at ** 1.6) * (1.0 - 0.25 * np.exp(-(t / 0.14) ** 2))
    out_lo = in_lo + t_lo * (1.0 - at ** 1.8)
    open_ = float(np.max(in_lo - in_up)) > 0.3
    if open_:
        canvas.polygon(np.concatenate([_pts(xs, in_up), _pts(xs, in_lo)[::-1]]), (70, 22, 28))
        band = at < 0.72
        teeth_lo = np.minimum(in_up + 3.2, in_lo)
        canvas.polygon(np.concatenate([_pts(xs[band], in_up[band]),
                                       _pts(xs[band], teeth_lo[band])[::-1]]), (238, 234, 222))
        if a('AU16') > 0.1 or gap > 5.0:
            teeth_hi = np.maximum(in_lo - 2.4, in_up)
            canvas.polygon(np.concatenate([_pts(xs[band], teeth_hi[band]),
                                           _pts(xs[band], in_lo[band])[::-1]]), (226, 222, 210))
    canvas.polygon(np.concatenate([_pts(xs, out_up), _pts(xs, in_up)[::-1][1:-1]]),
                   _shade(idt.lip_color, 0.9))
    canvas.polygon(np.concatenate([_pts(xs, in_lo), _pts(xs, out_lo)[::-1][1:-1]]), idt.lip_color)
    canvas.line(_pts(xs, in_up), (90, 35, 40) if not open_ else _shade(idt.lip_color, 0.6), 0.8)
    for s in ((-1.0, 1.0) if a('AU14') > 0 else ()):  # AU14: dimples beside the corners
        c = np.array([_CX + s * (half + 2.8), corner_y - 0.5])
        canvas.line(np.array([c + [0.0, -2.2], c + [s * 0.8, 0.0], c + [0.0, 2.2]]), fold(0.9 * a('AU14')), 0.8)
    # AU17: the chin boss pushes up and the fold under the lower lip deepens, with a dimpled chin
    sulcus_y = float(out_lo[7]) + 3.0 - 0.8 * a('AU17')
    canvas.line(_quad((_CX - 7.0, sulcus_y + 1.2), (_CX, sulcus_y), (_CX + 7.0, sulcus_y + 1.2), 7),
                fold(0.2 + 0.6 * a('AU17')), 0.8)
    if a('AU17') > 0:
        for dx, dy in ((-3.0, 4.0), (2.5, 4.5), (0.0, 6.5), (-4.0, 7.0), (4.0, 7.5)):
            canvas.polygon(_ellipse(_CX + dx, sulcus_y + dy, 0.8, 0.6, 6), fold(0.7 * a('AU17')))
    geo['mouth_left'] = np.array([_CX - half, corner_y])
    geo['mouth_right'] = np.array([_CX + half, corner_y])
    geo['lip_upper_inner'] = np.array([_CX, in_up[7]])
    geo['lip_lower_inner'] = np.array([_CX, in_lo[7]])
    geo['lip_upper_outer'] = np.array([_CX, out_up[7]])
    geo['lip_lower_outer'] = np.array([_CX, out_lo[7]])
    return geo


# --------------------------------------------------------------------------------------------------------- renderer
_POSE_CENTER = np.array([56.0, 64.0])  # the pose jitter rotates and scales about the middle of the face


def _pose_matrix(idt: Identity, unit: float) -> np.ndarray:
    """2x3 affine map from the 112 frame to canvas pixels: rotate and scale about the face, shift, then scale."""
    angle = math.radians(idt.rotation)
    rot = idt.scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offset = _POSE_CENTER - rot @ _POSE_CENTER + np.asarray(idt.shift, float)
    matrix = unit * np.concatenate([rot, offset[:, None]], 1)
    # Pillow puts integer coordinates on pixel centres. The box filter of the supersampled canvas averages canvas
    # pixels k*i .. k*i+k-1 into output pixel i, so output pixel centre i is canvas coordinate k*i + (k-1)/2:
    # this offset makes frame coordinates land on output pixel-centre coordinates (a point at 56 is pixel 56).
    matrix[:, 2] += (_SUPERSAMPLE - 1) / 2.0
    return matrix


_GRIDS: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        _GRIDS[size] = (g[None, :].repeat(size, 0), g[:, None].repeat(size, 1))
    return _GRIDS[size]


@functools.lru_cache(maxsize=None)
def _upsampler(size: int, cells: int = 6) -> np.ndarray:
    """(size, cells) linear-interpolation matrix: `U @ field @ U.T` upsamples a cells x cells field to the image."""
    pos = np.clip((np.arange(size) + 0.5) / size * cells - 0.5, 0.0, cells - 1.0)
    low = np.minimum(pos.astype(int), cells - 2)
    weights = np.zeros((size, cells), np.float32)
    weights[np.arange(size), low] = 1.0 - (pos - low)
    weights[np.arange(size), low + 1] = pos - low
    weights.flags.writeable = False
    return weights


_NOISE_BANKS: Dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
    """A fixed standard-normal field twice the image size; each image crops it at a random offset. Drawing fresh
    Gaussian noise per image was a third of the "real" style's time; a random crop of a large field is
    indistinguishable for a model and keeps images deterministic."""
    if size not in _NOISE_BANKS:
        _NOISE_BANKS[size] = np.random.default_rng(2207_09777).standard_normal((2 * size, 2 * size, 3), np.float32)
    return _NOISE_BANKS[size]


def _photograph(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The "real" style's camera: blur, uneven light, skin/wall texture, colour cast, sensor noise and JPEG."""
    size = image.size[0]
    # Optics first. The light and texture fields below are smooth, so applying them after the blur changes nothing
    # visible and lets all pixel arithmetic happen in one pass.
    image = image.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.2) * size / 112.0))
    xx, yy = _grid(size)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    gain = 1.0 + rng.uniform(0.15, 0.45) * (xx * math.cos(angle) + yy * math.sin(angle))
    gain *= 1.0 - rng.uniform(0.0, 0.25) * (xx * xx + yy * yy) / 2.0  # vignetting
    up = _upsampler(size)  # a smooth random 6x6 field, interpolated to the image
    gain *= 1.0 + rng.uniform(0.08, 0.2) * (up @ (rng.random((6, 6), np.float32) - 0.5) @ up.T)
    cast = rng.uniform(0.85, 1.12, size=3).astype(np.float32)
    contrast, brightness = rng.uniform(0.8, 1.1), rng.uniform(-20.0, 20.0)
    sigma = rng.uniform(2.0, 9.0)
    oy, ox = rng.integers(size, size=2)
    # (p * gain * cast - 128) * contrast + 128 + brightness + noise
    pixels = np.asarray(image, np.float32) * (gain[..., None] * (cast * contrast))
    pixels += 128.0 * (1.0 - contrast) + brightness
    pixels += sigma * _noise_bank(size)[oy:oy + size, ox:ox + size]
    np.clip(pixels, 0, 255, out=pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='JPEG', quality=int(rng.integers(25, 80)))
    buffer.seek(0)
    image = JpegImagePlugin.JpegImageFile(buffer)  # the plugin directly: no format sniffing per image
    image.load()
    return image


def render(
        aus: Mapping[Union[str, int], float],
        identity: Optional[Identity] = None,
        style: str = 'synthetic',
        size: int = 112,
        seed: int = 0,
        return_geometry: bool = False,
):
    """Draw one face showing the given Action Units.

    Args:
        aus: AU -> intensity in [0, 1] ('AU12', 12 or '12' as keys); AUs not given are at rest. Any AU of
            RENDERED_AUS may appear.
        identity: who is drawn; None draws a random identity of `style` from `seed`.
        style: 'synthetic' (clean, flat shading) or 'real' (texture, uneven light, colour cast, blur, noise, JPEG).
        size: output width and height in pixels; the layout is the aligned 112 frame scaled to it.
        seed: seeds the "real" style's camera effects (and the identity when none is given).
        return_geometry: also return a dict of named key points (brow ends, lid and lip midpoints, chin, ...).

    Returns:
        (image, landmarks) or (image, landmarks, geometry): a PIL RGB image of size x size; landmarks (5, 2)
        float32 in its pixel coordinates (eye centres, nose tip, mouth corners, image-left first), pose jitter
        included; geometry maps names to (2,) float32 points in the same coordinates.
    """
    _check_style(style)
    _check_seed(seed)
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f'size must be an integer >= 16 pixels, got {size!r}.')
    a = _au_reader(aus)
    if identity is None:
        identity = sample_identity(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1 << 20,))), style)
    canvas_size = size * _SUPERSAMPLE
    unit = canvas_size / 112.0
    matrix = _pose_matrix(identity, unit)
    image = Image.new('RGB', (canvas_size, canvas_size), identity.background)
    if style == 'real':  # a two-tone background: a wall and its shadow
        ImageDraw.Draw(image).rectangle((0, int(canvas_size * 0.55), canvas_size, canvas_size), identity.background2)
    canvas = _Canvas(unit)
    geometry = _draw_face(canvas, a, identity)
    canvas.render(image, matrix)
    image = image.reduce(_SUPERSAMPLE)
    if style == 'real':
        image = _photograph(image, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1 << 21,))))
    # the drawing transform, undone from canvas to output pixel centres (see _pose_matrix)
    to_pixels = _pose_matrix(identity, size / 112.0 * _SUPERSAMPLE)
    to_pixels[:, 2] -= (_SUPERSAMPLE - 1) / 2.0
    to_pixels /= _SUPERSAMPLE
    points = {k: (v @ to_pixels[:, :2].T + to_pixels[:, 2]).astype(np.float32) for k, v in geometry.items()}
    landmarks = np.stack([points[k] for k in ('eye_left', 'eye_right', 'nose_tip', 'mouth_left', 'mouth_right')])
    if return_geometry:
        return image, landmarks, points
    return image, landmarks


# ---------------------------------------------------------------------------------------------------------- dataset
def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float().div_(255.0)


class FacsFaces(Dataset):
    """Rendered faces with expression and AU labels, in the zoo's dataset contract.

    Item i is `(image, expression, aus)`: the image (a float tensor in [0, 1], 3 x size x size, or whatever
    `transform` makes of the PIL image), the expression label index (aucvt_zoo.labels.EXPRESSIONS), and the 0/1
    presence (AU_PRESENCE_THRESHOLD) of each AU of `au_names` as a float tensor. Item i of a given (seed, style)
    is always the same: its labels, identity and camera come from random streams derived from (seed, style, i)
    alone, so datasets of any length agree on their shared indices.

    Args:
        length: number of samples.
        style: 'synthetic' (train, as LSD's rendered faces) or 'real' (validation, as LSD's real photographs).
        au_names: AU label set name ('openface16', 'rafau21') or a list of AUs (any of RENDERED_AUS).
        size: image size in pixels.
        seed: dataset seed; use different seeds for train and validation of the same style.
        transform: callable applied to the PIL image; None converts it to a tensor in [0, 1].
        label_noise: probability that the expression label is swapped for another one.
    """

    def __init__(
            self,
            length: int,
            style: str = 'synthetic',
            au_names: Union[str, Sequence[Union[str, int]]] = 'openface16',
            size: int = 112,
            seed: int = 0,
            transform: Optional[Callable] = None,
            label_noise: float = 0.0,
    ):
        if not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f'length must be a non-negative integer, got {length!r}.')
        self.length = int(length)
        self.style = _check_style(style)
        self.au_names = resolve_aus(au_names)
        unrendered = [au for au in self.au_names if au not in RENDERED_AUS]
        if unrendered:
            raise ValueError(f'AU(s) {", ".join(unrendered)} are not rendered by the built-in faces, so their labels '
                             f'would always be 0; rendered AUs: {", ".join(RENDERED_AUS)}.')
        self.size = int(size)
        self.seed = _check_seed(seed)
        self.transform = transform
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f'label_noise is a probability in [0, 1], got {label_noise!r}.')
        self.label_noise = float(label_noise)
        self.expressions = EXPRESSIONS

    def __len__(self) -> int:
        return self.length

    def _index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f'index {index} out of range for a FacsFaces dataset of length {self.length}.')
        return index

    def labels(self, index: int) -> FaceLabels:
        """Labels of sample `index` without rendering it (cheap)."""
        return sample_labels(self._index(index), self.seed, self.style, self.label_noise)

    def identity(self, index: int) -> Identity:
        """The person drawn in sample `index`."""
        return sample_identity(_rng(self.seed, self.style, self._index(index), _STREAM_IDENTITY), self.style)

    def render(self, index: int, return_geometry: bool = False):
        """The PIL image and landmarks (and key points) of sample `index`; see `render`."""
        return self._render(self._index(index), self.labels(index), return_geometry)

    def _render(self, index: int, labels: FaceLabels, return_geometry: bool = False):
        camera_seed = int(_rng(self.seed, self.style, index, _STREAM_STYLE).integers(2 ** 63))
        return render(labels.intensities, self.identity(index), self.style, self.size, camera_seed, return_geometry)

    def targets(self) -> np.ndarray:
        """Expression labels of all samples (int64), without rendering: for samplers and class weights."""
        return np.array([self.labels(i).label for i in range(self.length)], np.int64)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, torch.Tensor]:
        index = self._index(index)
        labels = self.labels(index)
        image, _ = self._render(index, labels)
        image = self.transform(image) if self.transform is not None else _to_tensor(image)
        return image, labels.label, torch.from_numpy(labels.targets(self.au_names))

    def __repr__(self) -> str:
        return (f'FacsFaces(length={self.length}, style={self.style!r}, au_names={len(self.au_names)} AUs, '
                f'size={self.size}, seed={self.seed}, label_noise={self.label_noise}) -- procedurally rendered '
                f'FACS faces, not LSD')
