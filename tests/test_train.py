"""The trainer end to end on small generated datasets in the real formats (LSD folders, label CSV, RAF-AU).

The toy task is learnable: expression c is a bright band at rows 5c..5c+5 of a 32x32 noise image (flip-,
grayscale- and blur-proof, like the augmentations), and each expression shows a fixed set of AUs.
"""
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import aucvt_zoo  # noqa: F401  (registers the models)
from aucvt_zoo import evaluate as evaluate_mod
from aucvt_zoo import train as train_mod
from aucvt_zoo.data.readers import LsdFolder
from aucvt_zoo.labels import EXPRESSIONS

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ('ANGRER', 'disgust', 'Fear', 'HAPPINESS', 'sadness', 'SURPRISE')  # LSD's own spelling, mixed case
TOY_AUS = {0: ('AU4',), 1: ('AU9',), 2: ('AU1', 'AU5'), 3: ('AU6', 'AU12'), 4: ('AU15',), 5: ('AU1', 'AU2', 'AU26')}
AU_COLUMNS = ('AU1', 'AU2', 'AU4', 'AU5', 'AU6', 'AU9', 'AU12', 'AU15', 'AU26')
# a small learnable run; every test adds its model, data and output
FAST = ['--workers', '0', '--lr', '0.01', '--batch-size', '12', '--eval-batch-size', '24', '--no-pretrained',
        '--ir50-checkpoint', 'none', '--log-every', '1']


def _face(rng: np.random.Generator, expression: int) -> Image.Image:
    pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
    pixels[5 * expression:5 * expression + 5] = 230
    return Image.fromarray(pixels)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    for split, per_class in (('train', 8), ('val', 4)):
        rows = ['image,expression,' + ','.join(AU_COLUMNS)]
        for c, folder in enumerate(FOLDERS):
            (root / 'lsd' / split / folder).mkdir(parents=True)
            for i in range(per_class):
                name = f'lsd/{split}/{folder}/{i}.png'
                _face(rng, c).save(root / name)
                # the last image of a class has no AU labels (an OpenFace frame below the confidence threshold)
                aus = ['' if i == per_class - 1 else str(int(a in TOY_AUS[c])) for a in AU_COLUMNS]
                rows.append(f'{name},{EXPRESSIONS[c]},' + ','.join(aus))
        (root / f'{split}_openface.csv').write_text('\n'.join(rows) + '\n')
    (root / 'rafau' / 'aligned').mkdir(parents=True)
    lines = []
    for n in range(24):
        c = n % 6
        _face(rng, c).save(root / 'rafau' / 'aligned' / f'{n:04d}_aligned.png')
        # RAF-AU codes one-sided AUs as L12 / R12 and an image without AUs as 'null'; AU43 is outside rafau21
        code = 'null' if n == 23 else '+'.join(('L' if n % 2 else '') + a[2:] for a in TOY_AUS[c]) + '+43'
        lines.append(f'{n:04d}.png {code}')
    (root / 'rafau' / 'RAFAU_label.txt').write_text('\n'.join(lines) + '\n')
    return root


def _run(args, capsys=None):
    results = train_mod.main([str(a) for a in args])
    return results, capsys.readouterr().out if capsys else ''


def _weights(path: Path):
    return load_file(str(path / 'model.safetensors'))


def _ir50_tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / 'ir50_tiny.pth'
    torch.save(timm.create_model('ir50_tiny').state_dict(), path)
    return path


PRESET_RUNS = {
    # preset: (model, extra flags); the Table 1 models' code paths with small variants
    'resnet50-imagenet': ('test_resnet', ['--img-size', '64']),
    'vit-imagenet': ('test_vit', ['--img-size', '64']),
    'cvt': ('cvt_ir50_tiny', ['--ir50-checkpoint', '{ir50}']),
    'aucvt-rafau': ('aucvt_raf_tiny', ['--aux-data', '{data}/rafau', '--aux-batch-size', '6']),
    'aucvt-openface': ('aucvt_openface_tiny', []),
}


@pytest.mark.parametrize('preset', sorted(PRESET_RUNS))
def test_preset_runs_and_writes_outputs(preset, data, tmp_path, capsys):
    model_name, extra = PRESET_RUNS[preset]
    train_data = data / 'train_openface.csv' if preset == 'aucvt-openface' else data / 'lsd' / 'train'
    val_data = data / 'val_openface.csv' if preset == 'aucvt-openface' else data / 'lsd' / 'val'
    out = tmp_path / 'run'
    args = ['--preset', preset, '--model', model_name, '--data', train_data, '--val-data', val_data,
            '--output', out, '--epochs', '1', '--warmup-epochs', '0', '--max-steps', '2', '--eval-every', '1',
            *FAST, *[a.format(data=data, ir50=_ir50_tiny_file(tmp_path)) for a in extra]]
    results, stdout = _run(args, capsys)

    config = json.loads((out / 'config.json').read_text())
    assert config['preset'] == preset and config['model'] == model_name
    assert config['momentum'] == 0.9 and config['weight_decay'] == 5e-4  # the paper's recipe from the preset
    assert re.search(r'^  preset +"%s"$' % preset, stdout, re.M)  # the resolved config is printed before training
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2]
    assert all(len(r['confusion']) == 6 and len(r['per_class_f1']) == 6 for r in records)
    has_aus = preset.startswith('aucvt')
    assert ('mean_au_f1' in records[-1]) == (preset == 'aucvt-openface')  # only that val set has AU labels
    assert results['final']['step'] == 2 and results['best']['step'] in (1, 2)
    for sub in ('final', 'best'):
        hub_config = json.loads((out / sub / 'config.json').read_text())
        assert hub_config['architecture'] == model_name and hub_config['label_names'] == list(EXPRESSIONS)
        assert ('au_names' in hub_config) == has_aus
    # timm loads the Hub-format folder as it is, architecture arguments (img_size) included
    loaded = timm.create_model(f'local-dir:{out / "final"}', pretrained=True)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, _weights(out / 'final')[key], rtol=0, atol=0)
    checkpoint = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert checkpoint['step'] == 2
    for key, value in _weights(out / 'final').items():
        assert torch.equal(checkpoint['model'][key], value)
    assert 'eval step 2' in stdout and 'final (step 2)' in stdout
    # the AU term is live exactly where AU labels reach an AU branch: the CSV's columns or RAF-AU's batch
    bce = [float(x) for x in re.findall(r'^step \d+/2 .* bce (\S+)', stdout, re.M)]
    assert len(bce) == 2 and all((b > 0) == has_aus for b in bce)


def test_learns_the_toy_task_with_au_labels_on_the_same_images(data, tmp_path, capsys):
    out = tmp_path / 'run'
    # the AU loss is a mean over (images x AUs) entries, so its gradient per logit is small: beta 10 lets a
    # few steps show it falling
    results, stdout = _run([
        '--preset', 'aucvt-openface', '--model', 'aucvt_openface_tiny', '--data', data / 'train_openface.csv',
        '--val-data', data / 'val_openface.csv', '--output', out, '--epochs', '2', '--warmup-epochs', '0.25',
        '--beta', '10', *FAST], capsys)
    # not a terminal: one plain line per step
    steps = re.findall(r'^step \d+/8 epoch \S+ loss (\S+) ce (\S+) bce (\S+)', stdout, re.M)
    assert len(steps) == 8
    loss, ce, bce = (np.array([float(s[i]) for s in steps]) for i in range(3))
    assert loss[-3:].mean() < 0.7 * loss[0] and ce[-3:].mean() < 0.2 * ce[0]
    assert bce[-3:].mean() < bce[:2].mean() - 0.05
    final = results['final']['metrics']
    assert final['accuracy'] >= 0.9 and final['f1'] >= 0.9
    assert set(final['per_au_f1']) == set(timm.create_model('aucvt_openface_tiny').au_names)
    assert final['per_au_f1']['AU7'] is None  # no AU7 column: nothing to score, and no NaN in the JSON
    assert final['au_labelled']['AU12'] == 6 * 3  # 3 of the 4 val images per class carry AU labels


def test_resume_continues_bit_for_bit(data, tmp_path):
    # regime (b): a second loader over RAF-AU, dropout on, so the sample order and every RNG must be restored
    common = ['--model', 'aucvt_raf_tiny', '--data', data / 'lsd' / 'train', '--val-data', data / 'lsd' / 'val',
              '--aux-data', data / 'rafau', '--aux-batch-size', '6', '--epochs', '1.25', '--warmup-epochs', '0.5',
              '--eval-every', '4', '--drop-rate', '0.2', *FAST]
    whole, _ = _run([*common, '--output', tmp_path / 'whole'])  # 5 steps, 4 per epoch
    _run([*common, '--output', tmp_path / 'part', '--max-steps', '3'])  # stops inside the first epoch
    resumed, _ = _run([*common, '--output', tmp_path / 'part', '--resume', tmp_path / 'part', '--workers', '2'])
    a, b = _weights(tmp_path / 'whole' / 'final'), _weights(tmp_path / 'part' / 'final')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed['final'] == whole['final']
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / 'metrics.jsonl').read_text().splitlines()]
    assert [r for r in lines('part') if r['step'] != 3] == lines('whole')
    assert not any(torch.equal(a[k], timm.create_model('aucvt_raf_tiny').state_dict()[k]) for k in
                   ('head.weight', 'au_head.heads.0.fc.weight') if k in a)


def test_gradient_accumulation_equals_the_full_batch(data, tmp_path):
    # test_vit has no BatchNorm, so micro-batches of 4 must give the gradient of the batch of 12 exactly
    common = ['--model', 'test_vit', '--img-size', '32', '--data', data / 'lsd' / 'train', '--epochs', '1',
              '--warmup-epochs', '0', '--max-steps', '2', *FAST]
    _run([*common, '--output', tmp_path / 'one'])
    _run([*common, '--output', tmp_path / 'three', '--grad-accum-steps', '3'])
    a, b = _weights(tmp_path / 'one' / 'final'), _weights(tmp_path / 'three' / 'final')
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a['head.weight'], timm.create_model('test_vit', num_classes=6, img_size=32).head.weight)


def test_ir50_checkpoint_initialises_the_cvt_trunk(tmp_path):
    path = _ir50_tiny_file(tmp_path)
    model = train_mod.create_model('cvt_ir50_tiny', ir50_checkpoint=str(path))
    source = torch.load(path, weights_only=True)
    assert torch.equal(model.trunk.stem[0].weight, source['stem.0.weight'])
    with pytest.raises(ValueError, match='has none'):
        train_mod.create_model('test_resnet', ir50_checkpoint=str(path))


def test_open_dataset_picks_the_reader_and_passes_the_error_policy(data, tmp_path):
    transform = train_mod.eval_transform(dict(input_size=(3, 112, 112), mean=(0.5,) * 3, std=(0.5,) * 3))
    rafau = train_mod.open_dataset(str(data / 'rafau' / 'RAFAU_label.txt'), 'train', transform, ('AU1', 'AU12'))
    image, expression, aus = rafau[3]  # 0003: happiness, coded L6+L12+43 (one-sided AU12 counts as present)
    assert image.shape == (3, 112, 112) and expression == -1 and aus.tolist() == [0., 1.]
    csv = train_mod.open_dataset(str(data / 'val_openface.csv'), 'val', transform, ('AU12', 'AU7'))
    assert csv[12][1] == 3 and csv[12][2][0] == 1 and torch.isnan(csv[12][2][1])
    broken = tmp_path / 'faces'
    (broken / 'happy').mkdir(parents=True)
    (broken / 'happy' / 'a.png').write_bytes(b'not a png')
    _face(np.random.default_rng(0), 3).save(broken / 'happy' / 'b.png')
    with pytest.raises(OSError, match='a.png'):
        train_mod.open_dataset(str(broken), 'train', transform, ())[0]
    skipping = train_mod.open_dataset(str(broken), 'train', transform, (), on_error='skip')
    assert skipping[0][1] == 3 and skipping.skipped == 1


def test_weight_decay_spares_norms_biases_and_position_embeddings():
    model = timm.create_model('cvt_ir50_tiny', pos_embed=True)
    groups = train_mod.param_groups_weight_decay(model, 5e-4, no_weight_decay_list=model.no_weight_decay())
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert 'pos_embed' in names and 'norm.weight' in names and 'head.bias' in names
    assert 'head.weight' not in names and 'stages.0.blocks.0.attn.qkv.weight' not in names


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar, log = Terminal(), io.StringIO()
    for stream in (bar, log):
        progress = train_mod.Progress(total=4, enabled=True, log_every=2, stream=stream)
        for step in range(1, 5):
            progress.step(step, step / 2, dict(loss=1. / step, lr=1e-4, img_s=100.))
    assert bar.getvalue().count('\r') == 4 and '\n' not in bar.getvalue() and '4/4' in bar.getvalue()
    assert log.getvalue().splitlines() == [
        'step 2/4 epoch 1.00 loss 0.5 lr 0.0001 img_s 100', 'step 4/4 epoch 2.00 loss 0.25 lr 0.0001 img_s 100']


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    lrs = [train_mod.lr_at(s, 1e-4, 0., warmup_steps=3, total_steps=10) for s in range(10)]
    np.testing.assert_allclose(lrs[:3], [1e-4 / 3, 2e-4 / 3, 1e-4])
    assert lrs[3] == pytest.approx(1e-4) and all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] == pytest.approx(1e-4 * 0.5 * (1 + np.cos(np.pi * 6 / 7)))


def test_registered_data_source_gives_train_and_val_splits(data, tmp_path, monkeypatch):
    def toy(split, transform, au_names):
        return LsdFolder(str(data / 'lsd' / split), au_names=au_names, transform=transform)

    monkeypatch.setitem(train_mod.DATA_SOURCES, 'toy', toy)
    # with bfloat16 autocast, which CPUs support too
    results, _ = _run(['--model', 'cvt_ir50_tiny', '--data', 'toy', '--output', tmp_path / 'run', '--epochs', '1',
                       '--warmup-epochs', '0', '--max-steps', '1', '--amp', *FAST])
    assert results['selected_on'] == 'toy' and results['final']['metrics']['num_images'] == 24
    assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text())['train_loss'] > 0


def test_clear_errors(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mod.main(['--preset', 'aucvt-rafau', '--data', str(data / 'lsd' / 'train')])
    assert 'pass --aux-data' in capsys.readouterr().err
    with pytest.raises(ValueError, match='multiple of 3'):
        _run(['--data', data / 'lsd' / 'train', *FAST, '--batch-size', '10', '--grad-accum-steps', '3'])
    with pytest.raises(FileNotFoundError, match='nowhere'):
        _run(['--model', 'cvt_ir50_tiny', '--data', tmp_path / 'nowhere', *FAST, '--output', tmp_path / 'x'])
    with pytest.raises(ValueError, match='no AU branch'):
        _run(['--model', 'cvt_ir50_tiny', '--data', data / 'lsd' / 'train', '--aux-data', data / 'rafau', *FAST,
              '--output', tmp_path / 'y'])
    (tmp_path / 'z').mkdir()
    (tmp_path / 'z' / 'checkpoint.pt').write_bytes(b'')
    with pytest.raises(FileExistsError, match='--resume'):
        _run(['--model', 'cvt_ir50_tiny', '--data', data / 'lsd' / 'train', *FAST, '--output', tmp_path / 'z'])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(data, tmp_path):
    common = ['--model', 'aucvt_openface_tiny', '--data', data / 'train_openface.csv', '--val-data',
              data / 'val_openface.csv', '--epochs', '1', '--warmup-epochs', '0', '--eval-every', '4', *FAST]
    env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), '-m', 'aucvt_zoo.train', *map(str, common),
           '--output', str(tmp_path / 'ddp')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    single, _ = _run([*common, '--output', tmp_path / 'single'])

    assert ddp['replica_mismatches'] == []  # DDP kept the two replicas identical, byte for byte
    assert ddp['final']['metrics']['num_images'] == 24  # every validation image once, none padded in twice
    # same global batches and loss normalisation; BatchNorm statistics (per process, 6 images each) are what
    # differs from the one-process run (SyncBatchNorm needs GPUs), so the weights are close, not equal
    for key in ('accuracy', 'f1', 'mean_au_f1'):
        assert abs(ddp['final']['metrics'][key] - single['final']['metrics'][key]) <= 0.15, key
    # the gathered metrics are exactly those of one process evaluating the saved weights
    alone = evaluate_mod.main(['--model', 'aucvt_openface_tiny', '--checkpoint', str(tmp_path / 'ddp' / 'final'),
                               '--data', str(data / 'val_openface.csv'), '--workers', '0'])
    for key in ('f1', 'accuracy', 'confusion', 'per_au_f1'):
        assert alone[key] == ddp['final']['metrics'][key], key
