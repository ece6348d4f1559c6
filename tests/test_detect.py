"""Detection: the MTCNN port finds drawn faces with their landmarks, batching agrees, the plug-in interface."""
import importlib.util
import os

import numpy as np
import pytest

from aucvt_zoo import detect as detect_mod
from aucvt_zoo.align import ARCFACE_TEMPLATE
from aucvt_zoo.detect import (
    DetectorUnavailableError, Face, FaceDetector, MtcnnDetector, _load_keras_weights, _nms_min, _ONet,
    create_detector, faces_from_landmarks, register_detector)
from test_align import draw_face

needs_mtcnn = pytest.mark.skipif(importlib.util.find_spec('mtcnn') is None,
                                 reason='MTCNN weights come with the optional extra aucvt_zoo[detect]')


@pytest.fixture(scope='module')
def mtcnn():
    return MtcnnDetector()


def _face_image(scale, offset, size=(256, 256)):
    lm = ARCFACE_TEMPLATE * scale + np.asarray(offset)
    return np.array(draw_face(lm, size=size)), lm


def assert_finds_face(detector: FaceDetector, image: np.ndarray, landmarks: np.ndarray, tolerance: float = 0.15):
    """The detector finds exactly one face, with each of its 5 landmarks within `tolerance` x the eye distance of
    the ground truth (order included: image-left eye first, mouth corners left then right) and a box around them.

    Any image with known landmarks plugs in here: drawn faces now, the built-in renderer's faces, photos.
    """
    faces = detector.detect(image)
    assert len(faces) == 1, f'{len(faces)} faces found'
    face = faces[0]
    assert face.score > 0.8
    iod = np.linalg.norm(landmarks[1] - landmarks[0])
    assert np.linalg.norm(face.landmarks - landmarks, axis=1).max() < tolerance * iod
    x1, y1, x2, y2 = face.box
    assert x1 < landmarks[:, 0].min() and x2 > landmarks[:, 0].max()
    assert y1 < landmarks[:, 1].min() and y2 > landmarks[:, 1].max()


@needs_mtcnn
@pytest.mark.parametrize('scale,offset', [(1.5, (60, 40)), (1.0, (100, 80))])
def test_mtcnn_finds_drawn_face_and_its_landmarks(mtcnn, scale, offset):
    assert_finds_face(mtcnn, *_face_image(scale, offset))


@needs_mtcnn
def test_mtcnn_finds_nothing_in_a_faceless_image_and_in_a_tiny_one(mtcnn):
    rng = np.random.default_rng(0)
    assert mtcnn.detect(np.full((200, 300, 3), 128, np.uint8)) == []
    assert mtcnn.detect(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) == []


@needs_mtcnn
def test_mtcnn_batch_equals_one_by_one(mtcnn):
    a, _ = _face_image(1.5, (60, 40))
    b, _ = _face_image(1.2, (80, 60))
    c = np.full((256, 256, 3), 90, np.uint8)
    d = np.pad(a, ((0, 40), (0, 0), (0, 0)), constant_values=90)
    batch = mtcnn.detect_batch([a, b, c, d])  # three of one size run together, one apart
    single = [mtcnn.detect(x) for x in (a, b, c, d)]
    assert [len(x) for x in batch] == [len(x) for x in single] == [1, 1, 0, 1]
    for fb, fs in zip(batch, single):
        for p, q in zip(fb, fs):
            np.testing.assert_allclose(p.landmarks, q.landmarks, atol=1e-3)
            assert p.score == pytest.approx(q.score, abs=1e-4)


@needs_mtcnn
def test_photo_from_scikit_image_if_installed(mtcnn):
    """A real photo with hand-marked landmarks: skimage's astronaut (public domain), read without importing skimage."""
    spec = importlib.util.find_spec('skimage')
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], 'data', 'astronaut.png')
    if not path or not os.path.isfile(path):
        pytest.skip('scikit-image (which ships astronaut.png) is not installed')
    from PIL import Image
    marked = np.array([[202, 101], [245, 103], [222, 127], [202, 140], [245, 141]], float)  # by eye, +-2 px
    assert_finds_face(mtcnn, np.array(Image.open(path).convert('RGB')), marked)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(detect_mod.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(DetectorUnavailableError, match=r'aucvt_zoo\[detect\].*--aligned'):
        detect_mod._mtcnn_weights_dir()


def test_keras_weight_layout_is_converted_and_checked():
    rng = np.random.default_rng(0)
    net = _ONet()
    # the mtcnn package's layout: conv (kh, kw, in, out), PReLU (1, 1, C), dense (in, out)
    keras = []
    for p in net.parameters():
        if p.ndim == 4:
            keras.append(rng.normal(size=(p.shape[2], p.shape[3], p.shape[1], p.shape[0])))
        elif p.ndim == 2:
            keras.append(rng.normal(size=(p.shape[1], p.shape[0])))
        elif len(keras) and keras[-1].ndim == 1 and keras[-2].ndim == 4:  # a PReLU after a conv
            keras.append(rng.normal(size=(1, 1, p.shape[0])))
        else:
            keras.append(rng.normal(size=tuple(p.shape)))
    _load_keras_weights(net, keras, 'onet')
    conv = net.body[0]
    np.testing.assert_allclose(conv.weight[5, 2, 0, 1].item(), keras[0][0, 1, 2, 5], rtol=1e-6)
    np.testing.assert_allclose(net.fc.weight[7, 100].item(), keras[12][100, 7], rtol=1e-6)
    keras[12] = keras[12][:-1]
    with pytest.raises(ValueError, match='does not fit'):
        _load_keras_weights(net, keras, 'onet')


def test_nms_min_overlap():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 8, 8], [20, 20, 30, 30], [0, 0, 10, 10.5]], float)
    scores = np.array([0.5, 0.9, 0.8, 0.7])
    # the small box lies inside the big ones: overlap/min-area = 1, so only it and the far box survive
    assert sorted(_nms_min(boxes, scores, 0.7).tolist()) == [1, 2]


def test_faces_from_user_landmarks():
    lm5 = ARCFACE_TEMPLATE + 100
    lm68 = np.random.default_rng(0).uniform(100, 200, (68, 2))
    (a,) = faces_from_landmarks(lm5)
    assert np.isnan(a.score) and np.array_equal(a.landmarks, lm5)
    assert a.box[0] < lm5[:, 0].min() and a.box[3] > lm5[:, 1].max()
    (b,) = faces_from_landmarks(lm68[None])
    assert b.landmarks.shape == (5, 2) and b.box[0] <= lm68[:, 0].min() and b.box[2] >= lm68[:, 0].max()


def test_register_and_create_detector():
    class Fixed(FaceDetector):
        name = 'fixed'

        def __init__(self, points):
            self.points = points

        def detect(self, image):
            return [Face(np.array([0, 0, 1, 1.]), 1.0, self.points)]

    register_detector('fixed_test', Fixed)
    try:
        det = create_detector('fixed_test', points=ARCFACE_TEMPLATE)
        assert det.detect_batch([np.zeros((4, 4, 3), np.uint8)] * 2)[1][0].score == 1.0
    finally:
        detect_mod.DETECTORS.pop('fixed_test')
    with pytest.raises(ValueError, match='Unknown face detector'):
        create_detector('nope')


@needs_mtcnn
@pytest.mark.parametrize('style,seed', [('synthetic', 3), ('real', 4)])
def test_mtcnn_finds_rendered_faces_and_their_landmarks(mtcnn, style, seed):
    """The built-in renderer draws a face and says where its landmarks are: the detector must agree."""
    from PIL import Image

    from aucvt_zoo.data.faces import FacsFaces
    face, landmarks = FacsFaces(8, style=style, seed=seed).render(0)
    scale, offset = 1.6, np.array([50.0, 40.0])
    canvas = Image.new('RGB', (300, 300), (128, 128, 128))
    canvas.paste(face.resize((round(112 * scale),) * 2, Image.BICUBIC), tuple(int(o) for o in offset))
    # 20% of the eye distance: MTCNN puts the cartoon's mouth corners ~18% off (eyes and nose ~8%)
    assert_finds_face(mtcnn, np.array(canvas), np.asarray(landmarks) * scale + offset, tolerance=0.2)
