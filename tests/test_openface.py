"""OpenFace 2.x CSVs -> label CSV, on CSVs written here the way OpenFace writes them."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from aucvt_zoo.data.openface import OPENFACE_AUS, best_face, main, openface_to_labels, read_openface_csv
from aucvt_zoo.data.readers import LabelCsv, LabelFileError

# OpenFace 2.x AU outputs: 17 intensities and 18 presences (AU28 has no intensity model), sorted by name.
REG = ('01', '02', '04', '05', '06', '07', '09', '10', '12', '14', '15', '17', '20', '23', '25', '26', '45')
CLS = ('01', '02', '04', '05', '06', '07', '09', '10', '12', '14', '15', '17', '20', '23', '25', '26', '28', '45')


def openface_csv(path, faces, mode='sequence', spaced=True):
    """Write an OpenFace CSV. faces: dicts with confidence, success, and AU intensities `r` / presences `c`
    ({'12': 2.5}); AUs not given are 0. mode 'sequence' = FeatureExtraction, 'image' = FaceLandmarkImg."""
    lead = ['frame', 'face_id', 'timestamp', 'confidence', 'success'] if mode == 'sequence' else ['face', 'confidence']
    header = lead + ['pose_Tx', 'pose_Ty'] + [f'AU{a}_r' for a in REG] + [f'AU{a}_c' for a in CLS]
    sep = ', ' if spaced else ','  # OpenFace 2.0 put a space after every comma of the header
    lines = [sep.join(header)]
    for i, face in enumerate(faces):
        if mode == 'sequence':
            values = [face.get('frame', 1), i, 0.0, face['confidence'], face.get('success', 1)]
        else:
            values = [i, face['confidence']]
        values += [12.5, -3.1]
        values += [face.get('r', {}).get(a, 0.0) for a in REG] + [face.get('c', {}).get(a, 0) for a in CLS]
        lines.append(sep.join(str(v) for v in values))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def _image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (16, 16), (90, 90, 90)).save(path)


@pytest.fixture
def lsd(tmp_path):
    """LSD-like images in expression folders, and OpenFace output in a mirrored folder tree."""
    images, out = tmp_path / 'LSD', tmp_path / 'openface'
    for name in ('ANGRER/a1', 'ANGRER/a2', 'HAPPINESS/h1', 'HAPPINESS/h2', 'SURPRISE/s1', 'SURPRISE/s2'):
        _image(str(images / f'{name}.jpg'))
    # a1: one good face, AU4 present, AU4 intensity 1.4
    openface_csv(str(out / 'ANGRER/a1.csv'), [dict(confidence=0.98, c={'04': 1, '07': 1}, r={'04': 1.4, '07': 0.6})])
    # a2: tracking failed
    openface_csv(str(out / 'ANGRER/a2.csv'), [dict(confidence=0.95, success=0, c={'04': 1})])
    # h1: two faces; the more confident one (second) is kept
    openface_csv(str(out / 'HAPPINESS/h1.csv'), [dict(confidence=0.85, c={'01': 1}, r={'01': 3.0}),
                                                 dict(confidence=0.97, c={'06': 1, '12': 1},
                                                      r={'06': 0.9, '12': 2.2, '25': 1.0})])
    # h2: below the confidence threshold
    openface_csv(str(out / 'HAPPINESS/h2.csv'), [dict(confidence=0.79, c={'12': 1})])
    # s1: FaceLandmarkImg layout (no success column), without spaces
    openface_csv(str(out / 'SURPRISE/s1.csv'), [dict(confidence=0.9, c={'01': 1, '02': 1, '26': 1, '28': 1},
                                                     r={'01': 2.0, '26': 0.99})], mode='image', spaced=False)
    # s2: OpenFace found no face: header only
    openface_csv(str(out / 'SURPRISE/s2.csv'), [], mode='image')
    return images, out


def _rows(path):
    with open(path) as f:
        return [line.rstrip('\n').split(',') for line in f]


def _present(row):
    return [a for a, v in zip(OPENFACE_AUS, row[2:]) if v == '1']


def test_read_openface_csv_strips_spaced_headers(lsd):
    _, out = lsd
    rows = read_openface_csv(str(out / 'HAPPINESS/h1.csv'))
    assert len(rows) == 2 and rows[1]['confidence'] == '0.97' and rows[1]['AU12_c'] == '1'
    assert best_face(rows, 'h1.csv')['face_id'] == '1'


def test_presence_rule_with_expressions(lsd, tmp_path):
    images, out = lsd
    target = tmp_path / 'labels' / 'lsd_openface.csv'
    summary = openface_to_labels(str(out), str(target), images=str(images), expressions_from_folders=True)
    rows = _rows(target)
    assert rows[0] == ['image', 'expression'] + list(OPENFACE_AUS)
    assert [r[:2] for r in rows[1:]] == [['../LSD/ANGRER/a1.jpg', 'anger'], ['../LSD/HAPPINESS/h1.jpg', 'happiness'],
                                         ['../LSD/SURPRISE/s1.jpg', 'surprise']]
    assert _present(rows[1]) == ['AU4', 'AU7']
    assert _present(rows[2]) == ['AU6', 'AU12']  # the more confident face, not AU1 of the other one
    assert _present(rows[3]) == ['AU1', 'AU2', 'AU26']  # AU28 is outside openface16
    counts = summary['counts']
    assert counts == dict(csv_files=6, images=6, csv_without_image=0, images_without_csv=0, no_face=1, failed=1,
                          low_confidence=1, multi_face=1, labelled=3, written=3)
    side = json.load(open(str(target) + '.json'))
    assert side['rule'] == 'presence' and side['min_confidence'] == 0.8 and side['intensity_threshold'] is None
    assert side['counts'] == counts and side['positives']['AU12'] == 1 and side['au_names'] == list(OPENFACE_AUS)

    ds = LabelCsv(str(target), au_names='openface16')  # the file is a LabelCsv and its paths resolve
    image, expression, aus = ds[1]
    assert expression == 3 and image.shape == (3, 16, 16)
    assert aus[OPENFACE_AUS.index('AU12')] == 1 and aus.sum() == 2 and not torch.isnan(aus).any()


def test_intensity_rule_and_thresholds(lsd, tmp_path):
    images, out = lsd
    target = str(tmp_path / 'l.csv')
    openface_to_labels(str(out), target, images=str(images), rule='intensity', intensity_threshold=1.0,
                       min_confidence=0.5)
    rows = {r[0].split('/')[-1]: r for r in _rows(target)[1:]}
    assert sorted(rows) == ['a1.jpg', 'h1.jpg', 'h2.jpg', 's1.jpg']  # h2 (0.79) passes a 0.5 threshold
    assert rows['a1.jpg'][1] == ''  # no expressions unless asked
    assert _present(rows['a1.jpg']) == ['AU4']  # 1.4 >= 1; AU7 at 0.6 is not
    assert _present(rows['h1.jpg']) == ['AU12', 'AU25']  # 1.0 counts (>=), AU6 at 0.9 does not
    assert _present(rows['s1.jpg']) == ['AU1']  # 0.99 < 1
    side = json.load(open(target + '.json'))
    assert side['rule'] == 'intensity' and side['intensity_threshold'] == 1.0 and side['min_confidence'] == 0.5
    openface_to_labels(str(out), target, images=str(images), rule='intensity', intensity_threshold=2.0)
    rows = {r[0].split('/')[-1]: r for r in _rows(target)[1:]}
    assert _present(rows['h1.jpg']) == ['AU12'] and _present(rows['a1.jpg']) == []


def test_keep_failed_keeps_expression_with_unlabelled_aus(lsd, tmp_path):
    images, out = lsd
    os.remove(out / 'SURPRISE/s2.csv')
    target = str(tmp_path / 'l.csv')
    summary = openface_to_labels(str(out), target, images=str(images), expressions_from_folders=True,
                                 keep_failed=True)
    assert summary['counts']['written'] == 6 and summary['counts']['images_without_csv'] == 1
    ds = LabelCsv(target, au_names='openface16')
    by_name = {os.path.basename(p): i for i, (p, _) in enumerate(ds.samples)}
    assert torch.isnan(ds.au_targets[by_name['a2.jpg']]).all()
    assert torch.isnan(ds.au_targets[by_name['s2.jpg']]).all() and ds.samples[by_name['s2.jpg']][1] == 5
    assert not torch.isnan(ds.au_targets[by_name['a1.jpg']]).any()


def test_flat_csv_dir_matches_by_stem_and_csvs_beside_images(tmp_path):
    images = tmp_path / 'faces'
    _image(str(images / 'happy' / 'x.png'))
    _image(str(images / 'sad' / 'y.jpg'))
    openface_csv(str(tmp_path / 'of' / 'x.csv'), [dict(confidence=0.9, c={'12': 1})])
    openface_csv(str(tmp_path / 'of' / 'y.csv'), [dict(confidence=0.9, c={'15': 1})])
    openface_csv(str(tmp_path / 'of' / 'orphan.csv'), [dict(confidence=0.9)])
    target = str(tmp_path / 'l.csv')
    summary = openface_to_labels(str(tmp_path / 'of'), target, images=str(images), expressions_from_folders=True)
    assert [r[:2] for r in _rows(target)[1:]] == [['faces/happy/x.png', 'happiness'], ['faces/sad/y.jpg', 'sadness']]
    assert summary['counts']['csv_without_image'] == 1
    # OpenFace run with -out_dir equal to the image folder: --images defaults to --csv-dir; out file is not read
    openface_csv(str(images / 'happy' / 'x.csv'), [dict(confidence=0.9, c={'12': 1})])
    _image(str(images / 'happy' / 'x_aligned' / 'face_det_000000.bmp'))  # OpenFace's crop, not a dataset image
    target = str(images / 'labels.csv')
    openface_to_labels(str(images), target, keep_failed=True)
    openface_to_labels(str(images), target, keep_failed=True)  # a second run must not take its own output for OpenFace output
    assert [r[0] for r in _rows(target)[1:]] == ['happy/x.png', 'sad/y.jpg']


def test_errors(lsd, tmp_path):
    images, out = lsd
    target = str(tmp_path / 'l.csv')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        openface_to_labels(str(tmp_path / 'nowhere'), target)
    with pytest.raises(ValueError, match='rule'):
        openface_to_labels(str(out), target, images=str(images), rule='max')
    _image(str(images / 'HAPPINESS' / 'a1.png'))  # a1.csv now fits ANGRER/a1.jpg exactly: fine
    openface_to_labels(str(out), target, images=str(images))
    _image(str(images / 'ANGRER' / 'a1.png'))  # ... but now two images are ANGRER/a1
    with pytest.raises(ValueError, match='fits several images'):
        openface_to_labels(str(out), target, images=str(images))


def test_expression_folder_errors(tmp_path):
    _image(str(tmp_path / 'im' / 'neutral' / 'n.jpg'))
    _image(str(tmp_path / 'im' / 'top.jpg'))
    openface_csv(str(tmp_path / 'of' / 'n.csv'), [dict(confidence=0.9)])
    with pytest.raises(ValueError, match="folder 'neutral'"):
        openface_to_labels(str(tmp_path / 'of'), str(tmp_path / 'l.csv'), images=str(tmp_path / 'im'),
                           expressions_from_folders=True)
    os.remove(tmp_path / 'of' / 'n.csv')
    openface_csv(str(tmp_path / 'of' / 'top.csv'), [dict(confidence=0.9)])
    with pytest.raises(ValueError, match='not inside an expression folder'):
        openface_to_labels(str(tmp_path / 'of'), str(tmp_path / 'l.csv'), images=str(tmp_path / 'im'),
                           expressions_from_folders=True)


@pytest.mark.parametrize('mutate, fragment', [
    (lambda t: t.replace('confidence', 'conf'), 'no "confidence" column'),
    (lambda t: t.replace('AU12_c', 'AU12_x'), "no 'AU12_c' column"),
    (lambda t: t.rsplit('\n', 2)[0] + '\n1, 0, 0.0\n', 'fields but the header has'),
    (lambda t: t + '2, 0, 0.0, 0.9, 1' + ', 0' * 37 + '\n', '2 frames in one CSV'),
    (lambda t: t.replace('0.98', 'n/a'), "confidence is 'n/a'"),
    (lambda t: '', 'empty file'),
])
def test_malformed_openface_csv(lsd, tmp_path, mutate, fragment):
    images, out = lsd
    path = out / 'ANGRER/a1.csv'
    path.write_text(mutate(path.read_text()))
    with pytest.raises(LabelFileError) as e:
        openface_to_labels(str(out), str(tmp_path / 'l.csv'), images=str(images))
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_presence_values_must_be_binary(lsd, tmp_path):
    images, out = lsd
    openface_csv(str(out / 'ANGRER/a1.csv'), [dict(confidence=0.98, c={'04': 0.5})])
    with pytest.raises(LabelFileError, match="AU04_c is '0.5'") as e:
        openface_to_labels(str(out), str(tmp_path / 'l.csv'), images=str(images))
    assert e.value.line == 2


def test_cli(lsd, tmp_path, capsys):
    images, out = lsd
    target = str(tmp_path / 'cli.csv')
    assert main(['--csv-dir', str(out), '--images', str(images), '--out', target, '--rule', 'intensity',
                 '--intensity-threshold', '1.5', '--min-confidence', '0.9', '--expressions-from-folders']) == 0
    assert json.loads(capsys.readouterr().out)['written'] == 3  # a1 (0.98), h1 (0.97), s1 (0.9 >= 0.9)
    assert [_present(r) for r in _rows(target)[1:]] == [[], ['AU12'], ['AU1']]
    side = json.load(open(target + '.json'))
    assert side['intensity_threshold'] == 1.5 and side['min_confidence'] == 0.9
    assert main(['--csv-dir', str(tmp_path / 'nowhere'), '--out', target]) == 2
    assert 'nowhere' in capsys.readouterr().err


def test_module_entry_point(lsd, tmp_path):
    images, out = lsd
    target = str(tmp_path / 'm.csv')
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, '-m', 'aucvt_zoo.data.openface', '--csv-dir', str(out), '--images',
                             str(images), '--out', target], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(_rows(target)) == 4 and os.path.isfile(target + '.json')
