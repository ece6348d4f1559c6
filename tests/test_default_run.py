"""`python -m aucvt_zoo.train` with no arguments: the built-in faces, a tiny AU-CVT, the usual outputs."""
import json

import pytest

from aucvt_zoo import train as train_mod


@pytest.fixture
def small_builtin(monkeypatch):
    # the same faces and code path, fewer of them: 2 epochs of 30 steps of 32 synthetic faces, 240 real-style faces
    monkeypatch.setitem(train_mod.BUILTIN_SIZES, 'train', 960)
    monkeypatch.setitem(train_mod.BUILTIN_SIZES, 'val', 240)


def test_default_run_trains_on_builtin_faces_and_beats_chance(small_builtin, tmp_path, capsys):
    results = train_mod.main(['--batch-size', '32', '--epochs', '2', '--warmup-epochs', '0.2', '--workers', '0',
                              '--output', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    assert 'NOT LSD' in out and '"aucvt_openface_tiny"' in out  # says what the data is, and the demo model
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['data'] == 'builtin' and config['preset'] == 'demo' and config['model'] == 'aucvt_openface_tiny'
    assert config['train_images'] == 960 and config['val_images'] == 240
    for part in ('final/model.safetensors', 'final/config.json', 'best/model.safetensors', 'metrics.jsonl',
                 'results.json', 'checkpoint.pt'):
        assert (tmp_path / 'run' / part).exists(), part
    final = results['final']['metrics']
    # 240 real-style faces, 6 balanced classes: chance is 1/6; 0.25 is over 3 binomial standard deviations above
    assert final['accuracy'] > 0.25 and final['num_images'] == 240
    assert 'mean_au_f1' in final


def test_explicit_flags_win_over_the_demo_defaults(small_builtin, tmp_path):
    args = train_mod.parse_args(['--model', 'cvt_ir50_tiny', '--lr', '0.02'])
    assert args.data == 'builtin' and args.preset == 'demo'
    assert (args.model, args.lr, args.batch_size) == ('cvt_ir50_tiny', 0.02, train_mod.DEMO['batch_size'])
    paper = train_mod.parse_args(['--data', str(tmp_path)])
    assert paper.preset is None and paper.lr == 1e-4 and paper.batch_size == 512  # real data: the paper's recipe


def test_demo_table1_trains_three_models_on_the_same_faces(small_builtin, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train_mod.BUILTIN_SIZES, 'train', 64)
    monkeypatch.setitem(train_mod.BUILTIN_SIZES, 'val', 32)
    result = train_mod.main(['--preset', 'demo-table1', '--batch-size', '32', '--epochs', '1', '--warmup-epochs', '0',
                             '--workers', '0', '--output', str(tmp_path / 'table')])
    assert [r['model'] for r in result['rows']] == ['ir50_tiny', 'cvt_ir50_tiny', 'aucvt_openface_tiny']
    table = (tmp_path / 'table' / 'table1.md').read_text()
    assert table.startswith('| method |') and table.count('\n| ') == 3 and 'NOT LSD' in table
    assert '| CVT | `cvt_ir50_tiny` |' in capsys.readouterr().out
    for row in result['rows']:
        assert 0 <= row['f1'] <= 1 and (tmp_path / 'table' / row['model'] / 'final' / 'model.safetensors').exists()
