"""Dataset readers on small files written here in the datasets' own formats, and every malformed variant."""
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aucvt_zoo.data.readers import (
    LSD_PREDICTION_HEADER, ImageReadError, LabelCsv, LabelFileError, LsdFolder, LsdTestList, RafAu, read_predictions,
    write_predictions)
from aucvt_zoo.labels import AU_SETS, EXPRESSIONS


def _image(path, value, size=16):
    """A solid 16x16 image whose red channel encodes `value`, so tests can tell which file an item came from."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (size, size), (value, 7, 200)).save(path)
    return path


def _red(image_tensor):
    """The red value an item's image was written with (JPEG may shift it by a few levels; values are 10 apart)."""
    return int(round(float(image_tensor[0, 0, 0]) * 255 / 10)) * 10


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    return path


# ---------------------------------------------------------------- LSD folders

LSD_FOLDERS = ('ANGRER', 'DISGUST', 'fear', 'Happiness', 'SADNESS', 'surprise')


@pytest.fixture
def lsd(tmp_path):
    root = tmp_path / 'lsd'
    for i, folder in enumerate(LSD_FOLDERS):
        for j in range(2):
            _image(str(root / folder / f'{j:04d}.jpg'), 20 * i + 10 * j)
    _write(str(root / 'fear' / 'notes.txt'), 'not an image')
    return str(root)


def test_lsd_folder_labels_angrer_and_any_case(lsd):
    ds = LsdFolder(lsd)
    assert len(ds) == 12
    assert [e for _, e in ds.samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ds.class_counts == [2] * 6
    assert all(p.endswith('.jpg') for p, _ in ds.samples)  # notes.txt ignored
    image, expression, aus = ds[2]
    assert expression == 1 and _red(image) == 20
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16) and 0 <= image.min() and image.max() <= 1
    assert aus.shape == (0,)


def test_lsd_folder_aus_are_unlabelled_and_transform_applies(lsd):
    ds = LsdFolder(lsd, au_names='rafau21', transform=lambda im: torch.tensor(im.size))
    image, expression, aus = ds[0]
    assert image.tolist() == [16, 16]
    assert aus.dtype == torch.float32 and aus.shape == (21,) and torch.isnan(aus).all()
    assert ds.au_names == AU_SETS['rafau21']


def test_lsd_folder_unknown_folder_lists_folders_and_names(lsd):
    os.makedirs(os.path.join(lsd, 'neutral'))
    with pytest.raises(ValueError) as e:
        LsdFolder(lsd)
    msg = str(e.value)
    assert "'neutral'" in msg and 'ANGRER' in msg and 'happiness' in msg and 'angrer' in msg


def test_lsd_folder_missing_root_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        LsdFolder(str(tmp_path / 'nowhere'))
    os.makedirs(tmp_path / 'empty' / 'happy')
    with pytest.raises(FileNotFoundError, match='contain no images'):
        LsdFolder(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='no sub-folders'):
        LsdFolder(str(tmp_path / 'empty' / 'happy'))


def test_unreadable_image_raise_names_the_file(lsd):
    bad = _write(os.path.join(lsd, 'fear', '0000.jpg'), 'truncated')
    ds = LsdFolder(lsd)
    with pytest.raises(ImageReadError) as e:
        ds[4]
    assert bad in str(e.value) and "on_error='skip'" in str(e.value)
    assert _red(ds[5][0]) == 50  # the other images still read


def test_unreadable_image_skip_is_logged_counted_and_deterministic(lsd, caplog):
    bad = _write(os.path.join(lsd, 'fear', '0000.jpg'), 'truncated')
    with open(os.path.join(lsd, 'surprise', '0001.jpg'), 'r+b') as f:  # a real JPEG cut in half
        f.truncate(os.path.getsize(f.name) // 2)
    ds = LsdFolder(lsd, on_error='skip')
    with caplog.at_level(logging.WARNING, logger='aucvt_zoo.data.readers'):
        image, expression, _ = ds[4]
        assert (_red(image), expression) == (50, 2)  # the next sample in order, with its own label
        assert ds.skipped == 1 and bad in caplog.text
        again = ds[4]
        assert _red(again[0]) == 50 and ds.skipped == 1  # same replacement, counted once
        image, expression, _ = ds[11]  # the last sample wraps around to the first
        assert (_red(image), expression) == (0, 0) and ds.skipped == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_on_error_is_checked(lsd):
    with pytest.raises(ValueError, match='on_error'):
        LsdFolder(lsd, on_error='ignore')


def test_skip_when_nothing_is_readable(tmp_path):
    _write(str(tmp_path / 'happy' / 'a.jpg'), 'x')
    ds = LsdFolder(str(tmp_path), on_error='skip')
    with pytest.raises(ImageReadError, match='none of the 1 images'):
        ds[0]


# ---------------------------------------------------------------- generic label CSV

@pytest.fixture
def images(tmp_path):
    for i in range(4):
        _image(str(tmp_path / 'img' / f'{i}.png'), 50 + 10 * i)
    return tmp_path


def test_label_csv_full_format(images, caplog):
    csv_path = _write(str(images / 'labels.csv'),
                      ' image , Expression ,AU12,au4 ,AU13,source\n'
                      'img/0.png,happiness,1,0,1,a\n'
                      'img/1.png,ANGRER,,1,0,b\n'
                      '\n'
                      'img/2.png,5,0,,,c\n'
                      'img/3.png,,1,1,0,d\n')
    with caplog.at_level(logging.INFO, logger='aucvt_zoo.data.readers'):
        ds = LabelCsv(csv_path, au_names=['AU4', 'AU6', 'AU12'])
    assert 'AU13' in caplog.text and '1 AU column(s) not in the label set dropped' in caplog.text
    assert [e for _, e in ds.samples] == [3, 0, 5, -1]
    nan = float('nan')
    expected = torch.tensor([[0, nan, 1], [1, nan, nan], [nan, nan, 0], [1, nan, 1]])
    assert torch.equal(torch.isnan(ds.au_targets), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(ds.au_targets, -1), torch.nan_to_num(expected, -1))
    image, expression, aus = ds[1]
    assert _red(image) == 60 and expression == 0 and aus.dtype == torch.float32
    assert ds.missing_aus == ('AU6',)


def test_label_csv_root_and_no_aus(images, tmp_path):
    csv_path = _write(str(tmp_path / 'meta' / 'l.csv'), 'image\n2.png\n')
    ds = LabelCsv(csv_path, root=str(images / 'img'))
    image, expression, aus = ds[0]
    assert _red(image) == 70 and expression == -1 and aus.shape == (0,)
    with pytest.raises(FileNotFoundError, match='nope'):
        LabelCsv(csv_path, root=str(tmp_path / 'nope'))
    with pytest.raises(FileNotFoundError, match='missing.csv'):
        LabelCsv(str(tmp_path / 'missing.csv'))


def test_label_csv_missing_image_is_reported(images):
    csv_path = _write(str(images / 'l.csv'), 'image,expression\nimg/0.png,sad\nimg/gone.png,sad\n')
    ds = LabelCsv(csv_path)
    with pytest.raises(ImageReadError, match='gone.png'):
        ds[1]
    assert ds.missing_files() == [str(images / 'img' / 'gone.png')]
    skipping = LabelCsv(csv_path, on_error='skip')
    assert _red(skipping[1][0]) == 50 and skipping.skipped == 1


@pytest.mark.parametrize('text, line, fragment', [
    ('', 1, 'empty'),
    ('path,expression\nimg/0.png,sad\n', 1, 'no "image" column'),
    ('image,AU1,au1\nimg/0.png,1,1\n', 1, 'duplicate column'),
    ('image,expression\n', None, 'no data rows'),
    ('image,expression\nimg/0.png,sad\nimg/1.png\n', 3, '1 field(s) but the header has 2'),
    ('image,expression\nimg/0.png,sad,extra\n', 2, '3 field(s)'),
    ('image,expression\nimg/0.png,contempt\n', 2, 'not one of the 6 expressions'),
    ('image,expression\nimg/0.png,6\n', 2, 'outside 0..5'),
    ('image,expression\n,sad\n', 2, 'empty "image" field'),
    ('image,AU12\nimg/0.png,1\nimg/1.png,yes\n', 3, "'AU12' has 'yes'"),
    ('image,AU12\nimg/0.png,2\n', 2, "'AU12' has '2'"),
    ('image,AU99\nimg/0.png,0.5\n', 2, "'AU99' has '0.5'"),  # a column outside the set is still checked
])
def test_label_csv_malformed(images, text, line, fragment):
    csv_path = _write(str(images / 'bad.csv'), text)
    with pytest.raises(LabelFileError) as e:
        LabelCsv(csv_path, au_names=['AU12'])
    assert e.value.line == line and e.value.path == csv_path
    assert fragment in str(e.value)
    assert str(e.value).startswith(csv_path + (f', line {line}' if line else ''))


# ---------------------------------------------------------------- RAF-AU

@pytest.fixture
def rafau(tmp_path):
    root = tmp_path / 'RAF-AU'
    for i in range(1, 5):
        _image(str(root / 'aligned' / f'{i:04d}_aligned.jpg'), 100 + 10 * i)
    _write(str(root / 'RAFAU_label.txt'),
           '0001.jpg 1+2+L12+R4\n'
           '0002.jpg null\n'
           '0003.jpg 6+12+25+43+R28\n'
           '\n'
           '0004.jpg r14+l7+27\n')
    return str(root)


def test_rafau_tokens_null_and_dropped(rafau, caplog):
    with caplog.at_level(logging.INFO, logger='aucvt_zoo.data.readers'):
        ds = RafAu(rafau)
    assert 'dropped 2 label(s)' in caplog.text and 'AU28 x1' in caplog.text and 'AU43 x1' in caplog.text
    assert ds.dropped_aus == {'AU43': 1, 'AU28': 1}
    aus_set = AU_SETS['rafau21']

    def present(i):
        return [aus_set[j] for j in range(21) if ds.au_targets[i, j] == 1]

    assert present(0) == ['AU1', 'AU2', 'AU4', 'AU12']
    assert present(1) == [] and not torch.isnan(ds.au_targets[1]).any()  # null: coded, no AU present
    assert present(2) == ['AU6', 'AU12', 'AU25']
    assert present(3) == ['AU7', 'AU14', 'AU27']
    image, expression, aus = ds[2]
    assert _red(image) == 130 and expression == -1 and aus.shape == (21,)
    assert ds.samples[0][0].endswith(os.path.join('aligned', '0001_aligned.jpg'))


def test_rafau_null_drop(rafau):
    ds = RafAu(rafau, null='drop')
    assert len(ds) == 3 and ds.null_count == 1 and _red(ds[1][0]) == 130
    with pytest.raises(ValueError, match="null must be 'absent' or 'drop'"):
        RafAu(rafau, null='nan')


def test_rafau_other_label_set_and_layout(rafau):
    os.rename(os.path.join(rafau, 'aligned'), os.path.join(rafau, 'faces'))
    os.rename(os.path.join(rafau, 'RAFAU_label.txt'), os.path.join(rafau, 'labels.txt'))
    ds = RafAu(rafau, au_names=['AU12', 'AU4'], label_file='labels.txt', image_dir='faces')
    assert ds.au_targets.tolist() == [[1, 1], [0, 0], [1, 0], [0, 0]]
    assert _red(ds[3][0]) == 140


@pytest.mark.parametrize('text, line, fragment', [
    ('0001.jpg 1+2\n0002.jpg\n', 2, 'expected "<image> <AUs>"'),
    ('0001.jpg 1+2 extra\n', 1, 'expected "<image> <AUs>"'),
    ('0001.jpg 1+X12\n', 1, "'X12'"),
    ('0001.jpg 1++2\n', 1, "''"),
    ('0001.jpg 12A\n', 1, "'12A'"),
    ('0001 1+2\n', 1, 'no extension'),
    ('\n\n', None, 'no labelled images'),
])
def test_rafau_malformed(rafau, text, line, fragment):
    path = _write(os.path.join(rafau, 'RAFAU_label.txt'), text)
    with pytest.raises(LabelFileError) as e:
        RafAu(rafau)
    assert e.value.line == line and fragment in str(e.value) and path in str(e.value)


def test_rafau_missing_files(rafau, tmp_path):
    with pytest.raises(FileNotFoundError, match='RAFAU_label'):
        RafAu(rafau, label_file='RAFAU_label.csv')
    with pytest.raises(FileNotFoundError, match='RAF-AU release'):
        RafAu(str(tmp_path / 'absent'))
    os.remove(os.path.join(rafau, 'aligned', '0002_aligned.jpg'))
    with pytest.raises(ImageReadError, match='0002_aligned.jpg'):
        RafAu(rafau)[1]


# ---------------------------------------------------------------- LSD test list and predictions

@pytest.fixture
def lsd_test(tmp_path):
    root = tmp_path / 'test'
    for i in range(3):
        _image(str(root / f'{i:05d}.jpg'), 200 + 10 * i)
    _write(str(tmp_path / 'test_list.txt'), 'image\n00002.jpg\n00000.jpg\n\n00001.jpg,extra\n')
    return root


def test_lsd_test_list(lsd_test, tmp_path):
    ds = LsdTestList(str(lsd_test), str(tmp_path / 'test_list.txt'))
    assert ds.names == ['00002.jpg', '00000.jpg', '00001.jpg']
    image, name = ds[0]
    assert _red(image) == 220 and name == '00002.jpg'
    os.rename(tmp_path / 'test_list.txt', lsd_test / 'list.txt')
    assert LsdTestList(str(lsd_test), 'list.txt').names == ds.names  # relative to root


@pytest.mark.parametrize('text, line, fragment', [
    ('', 1, 'header'),
    ('image\n', None, 'no image names'),
    ('image\na.jpg\nb.jpg\na.jpg\n', 4, 'listed twice (first on line 2)'),
])
def test_lsd_test_list_malformed(lsd_test, tmp_path, text, line, fragment):
    path = _write(str(tmp_path / 'bad.txt'), text)
    with pytest.raises(LabelFileError) as e:
        LsdTestList(str(lsd_test), path)
    assert e.value.line == line and fragment in str(e.value)


def test_lsd_test_list_missing(lsd_test, tmp_path):
    with pytest.raises(FileNotFoundError, match='nolist.txt'):
        LsdTestList(str(lsd_test), str(tmp_path / 'nolist.txt'))
    _write(str(tmp_path / 'l.txt'), 'image\n00000.jpg\nmissing.jpg\n')
    with pytest.raises(ImageReadError, match='missing.jpg'):
        LsdTestList(str(lsd_test), str(tmp_path / 'l.txt'))[1]


def test_write_predictions_format_and_round_trip(tmp_path):
    path = str(tmp_path / 'out' / 'predictions.txt')
    write_predictions(path, ['b.jpg', 'a.jpg', 'c.jpg'], [5, 0, 3])
    with open(path) as f:
        assert f.read() == 'image,Anger,Disgust,Fear,Happiness,Sadness,Surprise\nb.jpg,5\na.jpg,0\nc.jpg,3\n'
    assert LSD_PREDICTION_HEADER.split(',')[1:] == [e.capitalize() for e in EXPRESSIONS]
    logits = torch.tensor([[0.1, 2.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 9.0]])
    write_predictions(path, ['x.jpg', 'y.jpg'], logits)
    assert read_predictions(path) == (['x.jpg', 'y.jpg'], [1, 5])


@pytest.mark.parametrize('names, predictions, fragment', [
    (['a'], [1, 2], '1 names'),
    (['a'], np.zeros((1, 7)), '7 scores'),
    (['a'], [6], 'integers in 0..5'),
    (['a'], [1.5], 'integers in 0..5'),
    (['a,b'], [1], 'comma'),
])
def test_write_predictions_rejects(tmp_path, names, predictions, fragment):
    with pytest.raises(ValueError, match=fragment):
        write_predictions(str(tmp_path / 'p.txt'), names, predictions)


def test_read_predictions_rejects_bad_lines(tmp_path):
    path = _write(str(tmp_path / 'p.txt'), LSD_PREDICTION_HEADER + '\na.jpg,1\nb.jpg,happy\n')
    with pytest.raises(LabelFileError) as e:
        read_predictions(path)
    assert e.value.line == 3
    _write(path, 'name,label\na.jpg,1\n')
    with pytest.raises(LabelFileError, match='header'):
        read_predictions(path)


def test_items_batch_with_default_collate(lsd, rafau):
    """The trainer concatenates LSD and RAF-AU items in one batch: shapes and dtypes must agree."""
    mixed = torch.utils.data.ConcatDataset([LsdFolder(lsd, au_names='rafau21'), RafAu(rafau)])
    images, expressions, aus = next(iter(torch.utils.data.DataLoader(mixed, batch_size=16)))
    assert images.shape == (16, 3, 16, 16) and expressions.dtype == torch.int64
    assert expressions.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, -1, -1, -1, -1]
    assert aus.shape == (16, 21) and torch.isnan(aus[:12]).all() and not torch.isnan(aus[12:]).any()
    assert math.isclose(float(aus[12:].sum()), 4 + 0 + 3 + 3)
