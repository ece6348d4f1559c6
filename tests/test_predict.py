"""predict: a folder of awkward files, the Python API, output formats, landmarks input, checkpoints and video."""
import csv
import importlib.util
import json
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from aucvt_zoo.align import ARCFACE_TEMPLATE, align_face
from aucvt_zoo.labels import AU_SETS, EXPRESSIONS
from aucvt_zoo.predict import Predictor, load_model, main, read_landmarks_csv
from test_align import draw_face

needs_mtcnn = pytest.mark.skipif(importlib.util.find_spec('mtcnn') is None,
                                 reason='MTCNN weights come with the optional extra aucvt_zoo[detect]')
MODEL = 'aucvt_openface_tiny'
FACE_LM = ARCFACE_TEMPLATE * 1.5 + [60, 40]


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model(MODEL).eval()


@pytest.fixture(scope='module')
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """One file of each awkward kind, plus a plain face."""
    d = tmp_path_factory.mktemp('media')
    face = draw_face(FACE_LM)
    face.save(d / 'face.png')
    face.convert('L').save(d / 'gray.png')
    rgba = face.convert('RGBA')
    alpha = np.array(rgba)
    alpha[:, :30, 3] = 0  # a transparent margin
    Image.fromarray(alpha).save(d / 'alpha.png')
    Image.new('RGB', (200, 150), (120, 130, 140)).save(d / 'noface.png')
    face.resize((6, 6)).save(d / 'tiny.png')
    (d / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
    face.save(d / 'full.jpg', quality=90)
    (d / 'truncated.jpg').write_bytes((d / 'full.jpg').read_bytes()[:600])
    (d / 'full.jpg').unlink()
    sub = d / 'sub'
    sub.mkdir()
    face.save(sub / 'nested.jpg')
    return d


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _by_name(rows):
    out = {}
    for r in rows:
        out.setdefault(r['source'].replace('\\', '/').rsplit('/', 1)[-1], []).append(r)
    return out


@needs_mtcnn
def test_cli_folder_gives_every_file_a_row_or_error(folder, checkpoint, tmp_path):
    out = tmp_path / 'out.csv'
    crops = tmp_path / 'crops'
    rc = main([str(folder), '--model', MODEL, '--checkpoint', str(checkpoint), '--device', 'cpu', '--precision', 'fp32', '--output',
               str(out), '--quiet', '--save-crops', str(crops), '--annotate', str(tmp_path / 'ann')])
    assert rc == 0
    rows = _read_csv(out)
    assert list(rows[0]) == (['source', 'frame', 'face', 'x1', 'y1', 'x2', 'y2', 'score', 'expression']
                             + list(EXPRESSIONS) + list(AU_SETS['openface16']) + ['error'])
    by = _by_name(rows)
    assert set(by) == {'face.png', 'gray.png', 'alpha.png', 'noface.png', 'tiny.png', 'corrupt.jpg',
                       'truncated.jpg', 'nested.jpg'}
    for name in ('face.png', 'alpha.png', 'nested.jpg'):
        (r,) = by[name]
        assert r['error'] == '' and r['face'] == '0' and float(r['score']) > 0.8
        assert sum(float(r[e]) for e in EXPRESSIONS) == pytest.approx(1, abs=1e-4)
        assert r['expression'] == max(EXPRESSIONS, key=lambda e: float(r[e]))
        assert all(0 <= float(r[a]) <= 1 for a in AU_SETS['openface16'])
    # the cartoon face is found by its colours, so in grey MTCNN misses it: decoded, searched, reported
    for name in ('noface.png', 'tiny.png', 'gray.png'):
        assert [r['error'] for r in by[name]] == ['no face detected']
    for name in ('corrupt.jpg', 'truncated.jpg'):
        (r,) = by[name]
        assert r['error'].startswith('cannot read image') and r['face'] == '-1' and r['anger'] == ''
    assert len(list(crops.glob('*.png'))) == 3
    assert len(list((tmp_path / 'ann').glob('*.jpg'))) == 3


@needs_mtcnn
def test_detection_path_matches_landmarks_and_aligned_paths(model, folder):
    p = Predictor(model, device='cpu', precision='fp32', batch_size=3)
    path = str(folder / 'face.png')
    (detected,) = p.predict(path)
    # the same face aligned from the landmarks the detector found: same numbers without detection
    (given,) = p.predict([path], landmarks=[detected.landmarks[None]])
    assert np.isnan(given.score)
    for e in EXPRESSIONS:
        assert given.expressions[e] == pytest.approx(detected.expressions[e], abs=1e-5)
    # and as an aligned float tensor
    crop = torch.from_numpy(np.array(align_face(Image.open(path), detected.landmarks))).permute(2, 0, 1) / 255.
    (as_tensor,) = p.predict(crop[None])
    for e in EXPRESSIONS:  # Pillow's warp (rounded to uint8) against the predictor's: close, not bit-equal
        assert as_tensor.expressions[e] == pytest.approx(detected.expressions[e], abs=0.01)
    # a float tensor is used as it is (not quantised), and a larger crop is resized to the model input
    exact = p._forward(crop[None])[0][0]
    (same,) = p.predict(crop[None], aligned=True)
    assert [same.expressions[e] for e in EXPRESSIONS] == pytest.approx(exact.tolist(), abs=1e-6)
    (big,) = p.predict(torch.nn.functional.interpolate(crop[None], size=(224, 224), mode='bilinear'))
    assert big.box == (0.0, 0.0, 223.0, 223.0) and big.error == ''


def test_aligned_inputs_need_no_detector_and_batching_does_not_change_results(model, folder):
    faces = [np.array(draw_face(ARCFACE_TEMPLATE + [0, 0], size=(112, 112)))] * 2
    paths = [str(folder / n) for n in ('noface.png', 'corrupt.jpg', 'tiny.png', 'gray.png')]
    inputs = faces + paths
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one = Predictor(model, device='cpu', precision='fp32', batch_size=1, detector=None, detect_batch=1).predict(inputs, aligned=True)
        many = Predictor(model, device='cpu', precision='fp32', batch_size=32, detector=None).predict(inputs, aligned=True)
    errors = [r.error for r in one]
    assert errors[:3] == ['', '', ''] and errors[3].startswith('cannot read image') and errors[4:] == ['', '']
    for a, b in zip(one, many):
        assert a.source == b.source and a.error == b.error
        for k in a.expressions:
            assert a.expressions[k] == pytest.approx(b.expressions[k], abs=1e-5)
        for k in a.aus:
            assert a.aus[k] == pytest.approx(b.aus[k], abs=1e-5)
    with pytest.raises(ValueError, match='no face detector'):
        Predictor(model, device='cpu', precision='fp32', detector=None).predict(inputs[:1])
    # a folder expands recursively, as on the command line
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rows = Predictor(model, device='cpu', precision='fp32', detector=None).predict(str(folder), aligned=True)
    assert len(rows) == 8 and sum(r.error.startswith('cannot read image') for r in rows) == 2


def test_alignment_self_check_warns_once_for_unaligned_crops(model):
    aligned = np.array(draw_face(ARCFACE_TEMPLATE, size=(112, 112)))
    shifted = np.array(draw_face(ARCFACE_TEMPLATE * 0.8 + [30, 5], size=(112, 112)))
    p = Predictor(model, device='cpu', precision='fp32', detector=None, batch_size=2, detect_batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        p.predict([aligned] * 3, aligned=True)
    p = Predictor(model, device='cpu', precision='fp32', detector=None, batch_size=2, detect_batch=2)
    with pytest.warns(UserWarning, match='do not look like template-aligned') as record:
        p.predict([shifted] * 6, aligned=True)
    assert len(record) == 1


def test_landmarks_csv_openface_headers_and_errors(model, folder, tmp_path):
    path = tmp_path / 'lm.csv'
    header = ['source', ' frame'] + [f' x_{i}' for i in range(5)] + [f' y_{i}' for i in range(5)]
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(['face.png', ''] + list(FACE_LM[:, 0]) + list(FACE_LM[:, 1]))
    table = read_landmarks_csv(path)
    np.testing.assert_allclose(table[('face.png', None)][0], FACE_LM)
    rows = list(Predictor(model, device='cpu', precision='fp32', detector=None).iter_paths([(str(folder / 'face.png'), '')],
                                                                          landmarks=table))
    assert len(rows) == 1 and rows[0].error == '' and np.isnan(rows[0].score)
    with open(path, 'a', newline='') as f:
        csv.writer(f).writerow(['x.png', '', 'oops'] + ['1'] * 9)
    with pytest.raises(ValueError, match='line 3'):
        read_landmarks_csv(path)


def test_jsonl_and_parquet_hold_the_same_rows_as_csv(model, checkpoint, folder, tmp_path):
    args = [str(folder / 'noface.png'), str(folder / 'gray.png'), '--aligned', '--model', MODEL, '--checkpoint',
            str(checkpoint), '--device', 'cpu', '--precision', 'fp32', '--quiet']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        main(args + ['--output', str(tmp_path / 'o.csv')])
        main(args + ['--output', str(tmp_path / 'o.jsonl')])
    rows_csv = _read_csv(tmp_path / 'o.csv')
    rows_json = [json.loads(line) for line in open(tmp_path / 'o.jsonl')]
    assert len(rows_csv) == len(rows_json) == 2
    for a, b in zip(rows_csv, rows_json):
        assert a['source'] == b['source'] and float(a['anger']) == pytest.approx(b['anger'])
        assert b['frame'] is None and b['score'] is None
    if importlib.util.find_spec('pyarrow') is None:
        pytest.skip('pyarrow not installed')
    import pyarrow.parquet as pq
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        main(args + ['--output', str(tmp_path / 'o.parquet')])
    table = pq.read_table(tmp_path / 'o.parquet').to_pylist()
    assert [r['source'] for r in table] == [r['source'] for r in rows_json]
    assert table[1]['AU12'] == pytest.approx(rows_json[1]['AU12'])


def test_checkpoint_folder_and_file(model, checkpoint, tmp_path):
    from timm.models import save_for_hf
    save_for_hf(model, str(tmp_path / 'hub'))
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        for m in (load_model(checkpoint=tmp_path / 'hub'), load_model(MODEL, checkpoint)):
            torch.testing.assert_close(m.eval()(x), ref)
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_model(MODEL, tmp_path)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(MODEL, tmp_path / 'missing.safetensors')


def test_video_rows_equal_per_image_rows(model, tmp_path):
    av = pytest.importorskip('av', reason='video needs PyAV (aucvt_zoo[video])')
    frames = [np.array(draw_face(ARCFACE_TEMPLATE * 1.5 + [50 + 4 * i, 40], size=(256, 256))) for i in range(5)]
    path = tmp_path / 'clip.mkv'
    with av.open(str(path), 'w') as container:  # FFV1 is lossless: decoded frames equal the written ones
        stream = container.add_stream('ffv1', rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 256, 'bgr0'
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        container.mux(stream.encode())
    landmarks = {i: (ARCFACE_TEMPLATE * 1.5 + [50 + 4 * i, 40])[None] for i in range(5)}
    p = Predictor(model, device='cpu', precision='fp32', detector=None, batch_size=2, detect_batch=2)
    p.annotate = tmp_path / 'annotated'
    video_rows = list(p.predict_video(path, every=2, landmarks=landmarks))
    assert [(r.frame, r.face) for r in video_rows] == [(0, 0), (2, 0), (4, 0)]
    (annotated,) = (tmp_path / 'annotated').glob('*.mp4')  # one annotated video, one frame per processed frame
    with av.open(str(annotated)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
        assert container.streams.video[0].average_rate == 5  # 10 fps, every 2nd frame
    p.annotate = None
    image_rows = p.predict([frames[i] for i in (0, 2, 4)], landmarks=[landmarks[i] for i in (0, 2, 4)])
    for v, i in zip(video_rows, image_rows):
        assert v.source == str(path) and v.error == ''
        for k in v.expressions:
            assert v.expressions[k] == pytest.approx(i.expressions[k], abs=1e-5)
        for k in v.aus:
            assert v.aus[k] == pytest.approx(i.aus[k], abs=1e-5)
    if importlib.util.find_spec('mtcnn') is not None:  # and with detection, through the CLI
        out = tmp_path / 'v.csv'
        save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
        main([str(path), '--model', MODEL, '--checkpoint', str(tmp_path / 'w.safetensors'), '--device', 'cpu', '--precision', 'fp32',
              '--output', str(out), '--quiet', '--every', '1'])
        rows = _read_csv(out)
        assert [r['frame'] for r in rows] == ['0', '1', '2', '3', '4'] and all(r['error'] == '' for r in rows)


def test_unreadable_video_is_a_row(model, tmp_path):
    pytest.importorskip('av', reason='video needs PyAV (aucvt_zoo[video])')
    bad = tmp_path / 'broken.mp4'
    bad.write_bytes(b'\x00\x00\x00\x18ftypmp42 not really a video')
    (row,) = Predictor(model, device='cpu', precision='fp32', detector=None).predict_video(bad)
    assert row.face == -1 and row.error.startswith('cannot read video')


def test_cli_without_detector_extra_fails_before_the_first_file(checkpoint, folder, monkeypatch, capsys):
    from aucvt_zoo import detect
    monkeypatch.setattr(detect.importlib.util, 'find_spec', lambda name: None)
    rc = main([str(folder), '--model', MODEL, '--checkpoint', str(checkpoint), '--device', 'cpu', '--precision', 'fp32', '--quiet'])
    assert rc == 2
    captured = capsys.readouterr()
    assert 'aucvt_zoo[detect]' in captured.err and captured.out == ''


def test_model_without_au_head_has_no_au_columns():
    p = Predictor(timm.create_model('ir50_tiny'), device='cpu', precision='fp32', detector=None)
    assert p.columns[-8:] == ['expression'] + list(EXPRESSIONS) + ['error']
    with pytest.warns(UserWarning, match='do not look like'):  # noise is not a face
        (r,) = p.predict(torch.rand(1, 3, 112, 112))
    assert r.aus == {} and sum(r.expressions.values()) == pytest.approx(1, abs=1e-5)
    with pytest.raises(ValueError, match='no classifier'):
        Predictor(timm.create_model('ir50_tiny', num_classes=0), device='cpu', precision='fp32')


def test_cli_reports_an_unusable_model_without_traceback(tmp_path, capsys):
    rc = main([str(tmp_path), '--model', MODEL, '--checkpoint', str(tmp_path / 'missing.safetensors'), '--quiet'])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'missing.safetensors does not exist' in err and 'Traceback' not in err


def test_auto_precision_picks_a_checked_path_and_reports_it(tmp_path, capsys):
    """By default the fastest path within the fp32 acceptance rule runs, and the CLI says which it was."""
    torch.manual_seed(0)
    model = timm.create_model('aucvt_openface_tiny', pretrained=True).eval()  # the shipped weights: real logits
    crops = torch.rand(24, 3, 112, 112)
    exact = Predictor(model, device='cpu', precision='fp32', detector=None).predict(crops)
    fast = Predictor(model, device='cpu', detector=None)
    rows = fast.predict(crops)
    assert fast.fast_path and 'fp32 eager' in fast.fast_summary  # the reference is among the candidates
    top = lambda r: max(r.expressions, key=r.expressions.get)  # noqa: E731
    agree = np.mean([top(a) == top(b) for a, b in zip(exact, rows)])
    assert agree >= 0.95
    with pytest.raises(ValueError, match='precision'):
        Predictor(model, device='cpu', precision='fp64')
