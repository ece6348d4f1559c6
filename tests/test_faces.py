"""The built-in FACS faces: determinism, what each AU moves, the label model, the dataset contract, the exporter."""
import csv
import importlib.util
import math
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from aucvt_zoo.data.faces import (
    AU_PRESENCE_THRESHOLD, LANDMARK_TEMPLATE, PROTOTYPE_DROP_RATE, PROTOTYPES, RENDERED_AUS, SPURIOUS_INTENSITY,
    SPURIOUS_RATE, STYLES, FacsFaces, au_presence, render, sample_identity, sample_labels,
)
from aucvt_zoo.data.faces_export import LSD_FOLDERS, export_split
from aucvt_zoo.labels import AU_SETS, EXPRESSIONS, regions_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aligned(seed: int = 0, style: str = 'synthetic'):
    return sample_identity(seed, style).aligned()


def _geometry(aus, seed: int = 0):
    return render(aus, _aligned(seed), 'synthetic', return_geometry=True)[2]


# ---------------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize('style', STYLES)
def test_same_seed_and_index_give_identical_bytes(style):
    a, b = FacsFaces(6, style=style, seed=3), FacsFaces(40, style=style, seed=3)
    for i in (0, 5):
        assert a.render(i)[0].tobytes() == b.render(i)[0].tobytes()
        assert np.array_equal(a.render(i)[1], b.render(i)[1])
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] and torch.equal(a[i][2], b[i][2])


def test_different_seeds_draw_different_identities_and_images():
    a, b = FacsFaces(4, seed=0), FacsFaces(4, seed=1)
    for i in range(4):
        assert a.identity(i) != b.identity(i)
        assert a.render(i)[0].tobytes() != b.render(i)[0].tobytes()
    assert len({FacsFaces(8, seed=0).identity(i).skin for i in range(8)}) > 1  # identities vary within a seed


# ------------------------------------------------------------------------------------------------------ landmarks
def _window(pixels, x, y):
    x, y = int(round(x)), int(round(y))
    return pixels[y - 1:y + 2, x - 1:x + 2]


def test_landmarks_of_aligned_face_follow_template_and_land_on_features():
    for seed in range(3):
        image, landmarks = render({}, _aligned(seed))
        # eye spacing and mouth width are identity traits: within a few pixels of the template
        assert np.abs(landmarks - LANDMARK_TEMPLATE).max() < 3.0
        assert np.allclose(landmarks[:, 1], LANDMARK_TEMPLATE[:, 1])
        pixels = np.asarray(image, np.float32).mean(2)
        for x, y in landmarks[:2]:  # the pupil is drawn at each eye centre
            assert _window(pixels, x, y).min() < 50


def test_pose_jitter_moves_drawing_and_landmarks_together():
    idt = replace(_aligned(1), rotation=8.0, scale=1.05, shift=(3.0, -2.0))
    image, landmarks = render({}, idt)
    _, aligned = render({}, idt.aligned())
    angle = math.radians(8.0)
    rot = 1.05 * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    expected = (aligned - (56.0, 64.0)) @ rot.T + (56.0, 64.0) + (3.0, -2.0)
    assert np.allclose(landmarks, expected, atol=1e-3)
    pixels = np.asarray(image, np.float32).mean(2)
    for x, y in landmarks[:2]:
        assert _window(pixels, x, y).min() < 50
    big = render({}, idt, size=224)[1]
    assert np.allclose(big, landmarks * 2.0, atol=1e-3)


# ----------------------------------------------------------------------------------------------- what AUs move
def _mouth_open(g):
    return g['lip_lower_inner'][1] - g['lip_upper_inner'][1]


def _corner_y(g):
    return (g['mouth_left'][1] + g['mouth_right'][1]) / 2


def _mouth_width(g):
    return g['mouth_right'][0] - g['mouth_left'][0]


def _eye_open(g):
    return (g['eye_left_bottom'][1] - g['eye_left_top'][1] + g['eye_right_bottom'][1] - g['eye_right_top'][1]) / 2


def _brow_y(part):
    return lambda g: (g[f'brow_left_{part}'][1] + g[f'brow_right_{part}'][1]) / 2


# (AU, what is measured, sign of its change as intensity rises; y grows downwards in images)
MOVES = [
    ('AU1', _brow_y('inner'), -1), ('AU2', _brow_y('outer'), -1), ('AU4', _brow_y('inner'), +1),
    ('AU4', lambda g: g['brow_right_inner'][0] - g['brow_left_inner'][0], -1),  # brows drawn together
    ('AU5', _eye_open, +1), ('AU6', _eye_open, -1), ('AU6', lambda g: g['cheek_left'][1], -1),
    ('AU6', lambda g: g['eye_left_bottom'][1], -1),  # narrowed from below
    ('AU7', _eye_open, -1), ('AU9', lambda g: g['ala_left'][1], -1), ('AU10', lambda g: g['lip_upper_inner'][1], -1),
    ('AU12', _corner_y, -1), ('AU12', _mouth_width, +1), ('AU14', _mouth_width, -1), ('AU15', _corner_y, +1),
    ('AU16', lambda g: g['lip_lower_inner'][1], +1), ('AU17', lambda g: g['lip_lower_inner'][1], -1),
    ('AU17', lambda g: g['chin'][1], -1), ('AU18', _mouth_width, -1), ('AU20', _mouth_width, +1),
    ('AU22', _mouth_width, -1), ('AU22', _mouth_open, +1),
    ('AU23', lambda g: g['lip_lower_outer'][1] - g['lip_upper_outer'][1], -1),
    ('AU24', lambda g: g['lip_lower_outer'][1] - g['lip_upper_outer'][1], -1),
    ('AU25', _mouth_open, +1), ('AU26', _mouth_open, +1), ('AU26', lambda g: g['chin'][1], +1),
    ('AU27', _mouth_open, +1),
]


@pytest.mark.parametrize('au,measure,sign', MOVES, ids=[f'{m[0]}-{i}' for i, m in enumerate(MOVES)])
def test_each_au_moves_what_facs_says(au, measure, sign):
    for seed in (0, 1):
        values = [measure(_geometry({au: level}, seed)) for level in (0.0, 0.5, 1.0)]
        steps = np.diff(values) * sign
        assert (steps > 0.2).all(), f'{au}: {values} should move with sign {sign}'


def test_mouth_opening_and_brow_raise_combine():
    assert _mouth_open(_geometry({'AU25': 1.0, 'AU26': 1.0})) > _mouth_open(_geometry({'AU26': 1.0}))
    both = _geometry({'AU1': 1.0, 'AU2': 1.0})
    assert _brow_y('peak')(both) < _brow_y('peak')(_geometry({'AU1': 1.0})) < _brow_y('peak')(_geometry({}))


@pytest.mark.parametrize('au', RENDERED_AUS)
def test_each_au_changes_pixels_inside_its_region_boxes(au):
    """Every rendered AU changes the drawing, and where it does is read by its paper7 region(s) of AU-CVT."""
    boxes = np.zeros((112, 112), bool)
    for region, _ in regions_for([au], 'paper7'):
        r0, r1, c0, c1 = region.cells(112, 112)  # 14x14 cells of 8 px
        boxes[r0:r1, c0:c1] = True
    for seed in (0, 2):
        idt = _aligned(seed)
        base = np.asarray(render({}, idt)[0], np.int32)
        changed = np.abs(np.asarray(render({au: 1.0}, idt)[0], np.int32) - base).sum(2) > 24
        assert changed.sum() >= 40, f'{au} barely changes the image'
        assert (changed & boxes).sum() >= 0.75 * changed.sum(), f'{au} draws outside its region boxes'


def test_nose_wrinkles_and_dimples_darken_skin():
    idt = _aligned(0)
    base = np.asarray(render({}, idt)[0], np.float32).mean(2)
    nose = np.asarray(render({'AU9': 1.0}, idt)[0], np.float32).mean(2)
    assert nose[56:64, 51:61].mean() < base[56:64, 51:61].mean() - 5  # lines across the bridge
    _, lm = render({'AU14': 1.0}, idt)
    dimple = np.asarray(render({'AU14': 1.0}, idt)[0], np.float32).mean(2)
    x, y = int(round(lm[4, 0] + 2.8)), int(round(lm[4, 1]))
    assert dimple[y - 2:y + 3, x - 1:x + 2].mean() < base[y - 2:y + 3, x - 1:x + 2].mean() - 5


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match='not rendered'):
        render({'AU43': 1.0}, _aligned())
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        render({'AU12': 1.5}, _aligned())
    with pytest.raises(ValueError, match='style'):
        render({}, _aligned(), style='cartoon')


# ---------------------------------------------------------------------------------------------------------- styles
def test_synthetic_is_flat_and_real_is_photographed():
    idt = replace(_aligned(0), hair_style=3)
    flat = np.asarray(render({}, idt, 'synthetic')[0], np.float32)
    photo = np.asarray(render({}, idt, 'real', seed=5)[0], np.float32)
    # a patch of forehead skin: one flat colour in "synthetic", texture + noise + JPEG in "real"
    assert flat[20:30, 50:62].std(axis=(0, 1)).max() == 0.0
    assert photo[20:30, 50:62].std(axis=(0, 1)).min() > 1.0
    assert render({}, idt, 'real', seed=5)[0].tobytes() != render({}, idt, 'real', seed=6)[0].tobytes()


# ---------------------------------------------------------------------------------------------------------- labels
def _labels(n=2000, **kwargs):
    return [sample_labels(i, seed=7, **kwargs) for i in range(n)]


def test_prototype_table_frequencies_hold_over_2000_samples():
    labels = _labels()
    counts = Counter(x.expression for x in labels)
    assert all(abs(counts[e] / len(labels) - 1 / 6) < 0.035 for e in range(6)), counts
    lo, hi = SPURIOUS_INTENSITY
    spurious_present = SPURIOUS_RATE * (hi - max(lo, AU_PRESENCE_THRESHOLD)) / (hi - lo)
    for e, name in enumerate(EXPRESSIONS):
        group = [x for x in labels if x.expression == e]
        prototype = PROTOTYPES[name]
        # each prototype AU stays unless dropped; if all are dropped one of them is put back
        kept = (1 - PROTOTYPE_DROP_RATE) + PROTOTYPE_DROP_RATE ** len(prototype) / len(prototype)
        for au in RENDERED_AUS:
            rate = np.mean([au in x.present() for x in group])
            expected = kept if au in prototype else spurious_present
            assert abs(rate - expected) < (0.07 if au in prototype else 0.03), (name, au, rate, expected)
        assert all(any(au in x.intensities for au in prototype) for x in group)


def test_label_noise_rate_and_spread():
    clean, noisy = _labels(label_noise=0.0), _labels(label_noise=0.3)
    assert all(x.label == x.expression for x in clean)
    flipped = [x for x in noisy if x.label != x.expression]
    assert abs(len(flipped) / len(noisy) - 0.3) < 0.035
    offsets = Counter((x.label - x.expression) % 6 for x in flipped)
    assert set(offsets) == {1, 2, 3, 4, 5} and all(abs(c / len(flipped) - 0.2) < 0.05 for c in offsets.values())
    # noise touches the label only: expressions and AUs are the same samples
    assert all(a.expression == b.expression and a.intensities == b.intensities for a, b in zip(clean, noisy))


def test_au_presence_is_one_threshold_for_every_consumer():
    x = sample_labels(0)
    intensities = {'AU1': AU_PRESENCE_THRESHOLD, 'AU2': AU_PRESENCE_THRESHOLD - 1e-6, 'AU12': 0.9}
    assert au_presence(intensities) == {'AU1': True, 'AU2': False, 'AU12': True}
    assert au_presence(np.array([0.1, 0.3])).tolist() == [False, True]
    fake = type(x)(x.expression, x.label, intensities)
    assert fake.present() == ('AU1', 'AU12')
    assert fake.targets(('AU2', 'AU1', 'AU12')).tolist() == [0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------------------- dataset
def test_dataset_contract_and_label_sets():
    ds = FacsFaces(5, style='real', seed=2, label_noise=0.2)
    image, expression, aus = ds[3]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert isinstance(expression, int) and expression == ds.labels(3).label
    assert aus.dtype == torch.float32 and aus.tolist() == ds.labels(3).targets(AU_SETS['openface16']).tolist()
    assert ds[-1][1] == ds[4][1] and len(ds) == 5
    assert ds.targets().tolist() == [ds.labels(i).label for i in range(5)]
    assert FacsFaces(2, au_names='rafau21')[0][2].shape == (21,)
    assert FacsFaces(2, au_names=[12, 'AU6'])[0][2].tolist() == FacsFaces(2).labels(0).targets(('AU12', 'AU6')).tolist()
    small = FacsFaces(2, size=64, transform=lambda im: torch.tensor(im.size))
    assert small[1][0].tolist() == [64, 64]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match='not rendered'):
        FacsFaces(2, au_names=['AU43'])
    with pytest.raises(ValueError, match='style'):
        FacsFaces(2, style='photo')


def test_dataloader_workers_see_the_same_samples():
    ds = FacsFaces(4, seed=9)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    assert torch.equal(batch[0][2], ds[2][0]) and batch[1].tolist() == [ds[i][1] for i in range(4)]


# -------------------------------------------------------------------------------------------------------- exporter
def test_export_split_writes_lsd_openface_csv_and_rafau(tmp_path):
    n = 14
    written = export_split(str(tmp_path), n, style='real', seed=4, label_noise=0.2)
    ds = FacsFaces(n, style='real', seed=4, label_noise=0.2)
    assert sorted(os.listdir(written['lsd'])) == sorted(LSD_FOLDERS.values()) and 'ANGRER' in LSD_FOLDERS.values()
    with open(written['openface'], newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['image', 'expression'] + list(AU_SETS['openface16'])
    assert len(rows) == n + 1
    for i, row in enumerate(rows[1:]):
        labels = ds.labels(i)
        folder, name = row[0].split('/')[-2:]
        assert folder == LSD_FOLDERS[EXPRESSIONS[labels.label]] and row[1] == EXPRESSIONS[labels.label]
        assert [float(v) for v in row[2:]] == labels.targets(AU_SETS['openface16']).tolist()
        on_disk = np.asarray(Image.open(os.path.join(tmp_path, row[0])).convert('RGB'))
        assert np.array_equal(on_disk, np.asarray(ds.render(i)[0]))  # PNG: lossless
    with open(written['rafau']) as f:
        lines = f.read().splitlines()
    assert len(lines) == n
    for i, line in enumerate(lines):
        name, aus = line.split()
        assert name == f'{i + 1:04d}.jpg'
        present = ds.labels(i).present()
        assert aus == ('+'.join(au[2:] for au in present) if present else 'null')
        aligned = Image.open(os.path.join(os.path.dirname(written['rafau']), 'aligned', f'{i + 1:04d}_aligned.jpg'))
        assert aligned.size == (112, 112) and aligned.format == 'JPEG'
    assert 'NOT LSD' in open(os.path.join(tmp_path, 'README.txt')).read()
    with pytest.raises(ValueError, match='format'):
        export_split(str(tmp_path), 1, formats=('voc',))


def test_render_grid_example_writes_both_pictures(tmp_path):
    spec = importlib.util.spec_from_file_location('render_grid', os.path.join(REPO, 'examples', 'render_grid.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(['--out', str(tmp_path), '--identities', '1'])
    for name in ('expressions.png', 'aus.png'):
        image = Image.open(tmp_path / name)
        assert image.width > 200 and image.height > 200


def test_exported_split_reads_back_through_the_real_readers(tmp_path):
    """LSD folders, the OpenFace-style CSV, raw OpenFace CSVs and RAF-AU give the labels FacsFaces gives."""
    from aucvt_zoo.data.openface import openface_to_labels
    from aucvt_zoo.data.readers import LabelCsv, LsdFolder, RafAu
    n = 18
    written = export_split(str(tmp_path), n, style='synthetic', seed=11, label_noise=0.1,
                           formats=('lsd', 'openface', 'rafau', 'openface_raw'))
    ds = FacsFaces(n, seed=11, label_noise=0.1)
    labels = [ds.labels(i) for i in range(n)]
    by_name = {f'{i:06d}': x for i, x in enumerate(labels)}
    lsd = LsdFolder(written['lsd'])
    assert len(lsd) == n
    for path, expression in lsd.samples:
        assert expression == by_name[os.path.splitext(os.path.basename(path))[0]].label
    image, expression, _ = lsd[0]
    stem = os.path.splitext(os.path.basename(lsd.samples[0][0]))[0]
    assert torch.equal(image, FacsFaces(n, seed=11, label_noise=0.1)[int(stem)][0])  # same pixels as the dataset
    table = LabelCsv(written['openface'], au_names='openface16')
    assert [e for _, e in table.samples] == [x.label for x in labels]
    assert torch.equal(table.au_targets, torch.tensor(np.stack([x.targets(AU_SETS['openface16']) for x in labels])))
    converted = str(tmp_path / 'converted.csv')
    openface_to_labels(written['openface_raw'], converted, images=written['lsd'], expressions_from_folders=True)
    from_raw = LabelCsv(converted, au_names='openface16')
    targets = {os.path.basename(p)[:6]: t for (p, _), t in zip(from_raw.samples, from_raw.au_targets)}
    assert len(targets) == n
    assert all(targets[k].tolist() == by_name[k].targets(AU_SETS['openface16']).tolist() for k in targets)
    raf = RafAu(os.path.dirname(written['rafau']), au_names='rafau21')
    assert len(raf) == n and all(e == -1 for _, e in raf.samples)
    assert torch.equal(raf.au_targets, torch.tensor(np.stack([x.targets(AU_SETS['rafau21']) for x in labels])))
    assert raf[3][0].shape == (3, 112, 112)
