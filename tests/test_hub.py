"""Loading through the Hub, proven against a local Hub server (tests/hub_server.py) that the tests fill.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import; in-process tests therefore
patch `huggingface_hub.constants` (`hub_server.use_endpoint`), and `test_environment_variables_in_a_fresh_process`
shows the plain environment variables select the same server in a new process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aucvt_zoo  # noqa: F401  (registers the models)
import timm
from aucvt_zoo import convert, hub
from aucvt_zoo.hub import PretrainedWeightsError, WeightsIntegrityError

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub, hub_env, use_endpoint  # noqa: E402

ROOT = Path(__file__).parent.parent
RAF_REPO = hub.hub_repo_id('aucvt_raf_tiny.facs')  # the registered name's own repo id, served locally


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A started LocalHub selected as the endpoint, with an empty cache and an empty weights manifest."""
    with LocalHub() as server:
        use_endpoint(monkeypatch, server.url, tmp_path / 'hf-cache')
        monkeypatch.setenv(hub.MANIFEST_ENV, str(tmp_path / 'manifest.json'))
        yield server


def release(tmp_path, name, seed=0, **kwargs):
    """A random model of `name` and its release folder, written by the converter's `save_release`."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    out = tmp_path / f'{name}-{seed}'
    convert.save_release(model, out)
    return model, out


def outputs(model, x):
    with torch.no_grad():
        return model.forward_with_aus(x) if hasattr(model, 'forward_with_aus') else (model(x),)


def assert_same(a, b, x):
    for p, q in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(p, q)  # bitwise on CPU


def downloads(server):
    return server.count('GET', '/_lfs/') + server.count('GET', '/resolve/')


X = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def test_registered_name_pretrained_round_trip_then_cache(tmp_path, local_hub):
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    commit = local_hub.add_commit(RAF_REPO, folder)
    loaded = timm.create_model('aucvt_raf_tiny', pretrained=True).eval()
    assert_same(model, loaded, X)
    assert loaded.pretrained_cfg['hf_hub_id'] == f'{RAF_REPO}@{commit}'  # what was verified and loaded
    assert local_hub.count('GET', '/_lfs/') == 1

    # warm cache: one revision look-up (HEAD), no download
    before_heads, before_downloads = local_hub.count('HEAD'), downloads(local_hub)
    again = timm.create_model('aucvt_raf_tiny', pretrained=True).eval()
    assert_same(model, again, X)
    assert downloads(local_hub) == before_downloads
    assert local_hub.count('HEAD') == before_heads + 1

    # a pinned commit in the warm cache never touches the server
    total = local_hub.count()
    pinned = timm.create_model('aucvt_raf_tiny', pretrained=True,
                               pretrained_cfg_overlay=dict(hf_hub_id=f'{RAF_REPO}@{commit}')).eval()
    assert_same(model, pinned, X)
    assert local_hub.count() == total


def test_offline_warm_cache_loads_and_cold_cache_says_what_to_do(tmp_path, local_hub, monkeypatch):
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    local_hub.add_commit(RAF_REPO, folder)
    timm.create_model('aucvt_raf_tiny', pretrained=True)
    url = local_hub.url
    local_hub.stop()  # nothing to reach any more

    use_endpoint(monkeypatch, url, tmp_path / 'hf-cache', offline=True)
    offline = timm.create_model('aucvt_raf_tiny', pretrained=True).eval()
    assert_same(model, offline, X)

    use_endpoint(monkeypatch, url, tmp_path / 'cold-cache', offline=True)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('aucvt_raf_tiny', pretrained=True)
    message = str(info.value)
    assert RAF_REPO in message
    assert "pretrained_cfg_overlay=dict(file='model.safetensors')" in message and 'HF_ENDPOINT' in message


def test_unpublished_repo_error_names_repo(local_hub):
    with pytest.raises(PretrainedWeightsError, match=f"repo '{hub.hub_repo_id('aucvt_raf_tiny.facs')}'"):
        timm.create_model('aucvt_raf_tiny', pretrained=True)


def test_hf_hub_name_and_revision_pinning(tmp_path, local_hub):
    repo = 'tests/aucvt_openface_tiny.v'
    first, folder1 = release(tmp_path, 'aucvt_openface_tiny', seed=1)
    second, folder2 = release(tmp_path, 'aucvt_openface_tiny', seed=2)
    commit1 = local_hub.add_commit(repo, folder1, tag='v1')
    local_hub.add_commit(repo, folder2)

    latest = timm.create_model(f'hf-hub:{repo}', pretrained=True).eval()
    assert_same(second, latest, X)
    assert latest.au_names == aucvt_zoo.AU_SETS['openface16']
    assert_same(first, timm.create_model(f'hf-hub:{repo}@v1', pretrained=True).eval(), X)
    assert_same(first, timm.create_model(f'hf-hub:{repo}@{commit1}', pretrained=True).eval(), X)
    # what a user runs to find the commit behind a tag, and the same pin for a registered name
    from huggingface_hub import HfApi
    api = HfApi()
    assert api.model_info(repo, revision='v1').sha == commit1
    assert [(t.name, t.target_commit) for t in api.list_repo_refs(repo).tags] == [('v1', commit1)]
    assert sorted(s.rfilename for s in api.model_info(repo).siblings) == ['README.md', 'config.json', 'model.safetensors']
    pinned = timm.create_model('aucvt_openface_tiny', pretrained=True,
                               pretrained_cfg_overlay=dict(hf_hub_id=f'{repo}@v1')).eval()
    assert_same(first, pinned, X)


def test_torch_hub_load_local_repo(tmp_path, local_hub):
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    local_hub.add_commit(RAF_REPO, folder)
    loaded = torch.hub.load(str(ROOT), 'aucvt_raf_tiny', source='local', pretrained=True).eval()
    assert_same(model, loaded, X)


def test_manifest_sha256_is_verified(tmp_path, local_hub):
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    commit = local_hub.add_commit(RAF_REPO, folder)
    good = hub.sha256_file(folder / 'model.safetensors')
    manifest = Path(os.environ[hub.MANIFEST_ENV])
    manifest.write_text(json.dumps({'entries': [
        dict(model='aucvt_raf_tiny.facs', repo_id=RAF_REPO, revision=commit, file='model.safetensors', sha256=good)]}))
    assert_same(model, timm.create_model('aucvt_raf_tiny', pretrained=True).eval(), X)

    bad = '0' * 64
    manifest.write_text(json.dumps({'entries': [
        dict(model='aucvt_raf_tiny.facs', repo_id=RAF_REPO, revision='main', file='model.safetensors', sha256=bad)]}))
    with pytest.raises(WeightsIntegrityError) as info:
        timm.create_model('aucvt_raf_tiny', pretrained=True)
    assert good in str(info.value) and bad in str(info.value) and RAF_REPO in str(info.value)


def test_corrupt_file_is_reported(tmp_path, local_hub):
    _, folder = release(tmp_path, 'aucvt_raf_tiny')
    data = (folder / 'model.safetensors').read_bytes()
    local_hub.add_commit(RAF_REPO, {'model.safetensors': data[: len(data) // 2],
                                    'config.json': (folder / 'config.json').read_bytes()})
    with pytest.raises(PretrainedWeightsError, match='not a readable safetensors file.*truncated or corrupt'):
        timm.create_model('aucvt_raf_tiny', pretrained=True)


def test_wrong_architecture_and_wrong_au_set_are_refused(tmp_path, local_hub):
    _, folder = release(tmp_path, 'aucvt_openface_tiny')
    local_hub.add_commit(RAF_REPO, folder)  # openface weights where the raf model looks
    with pytest.raises(PretrainedWeightsError, match="holds weights of 'aucvt_openface_tiny', not 'aucvt_raf_tiny'"):
        timm.create_model('aucvt_raf_tiny', pretrained=True)

    # same architecture, another AU list: the header says which AUs the file's heads predict
    _, raf_folder = release(tmp_path, 'aucvt_raf_tiny')
    weights = dict(pretrained_cfg_overlay=dict(file=str(raf_folder / 'model.safetensors')))
    with pytest.raises(PretrainedWeightsError, match='(?s)holds AU heads for AU1, AU2, AU4, .*AU27.*regions.mouth.fc'):
        timm.create_model('aucvt_raf_tiny', pretrained=True, au_labels=['AU1', 'AU2', 'AU4', 'AU5', 'AU7'], **weights)
    # ... even where every tensor shape matches (AU28 for AU12, both mouth AUs): refused by name
    swapped = [a if a != 'AU12' else 'AU28' for a in aucvt_zoo.AU_SETS['rafau21']]
    with pytest.raises(PretrainedWeightsError, match='has AU heads for .*AU12.*predicts .*AU28'):
        timm.create_model('aucvt_raf_tiny', pretrained=True, au_labels=swapped, **weights)


def test_wrong_num_classes_names_the_classifier_shapes(tmp_path, local_hub):
    _, folder = release(tmp_path, 'aucvt_raf_tiny', num_classes=4)
    local_hub.add_commit(RAF_REPO, folder)  # the registered config promises 6 expressions
    with pytest.raises(PretrainedWeightsError, match=r'(?s)size mismatch for head\.weight.*\[4, 6272\].*\[6, 6272\]'):
        timm.create_model('aucvt_raf_tiny', pretrained=True)


def test_file_without_zoo_header_still_names_keys_and_shapes(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(PretrainedWeightsError, match='No weight file at .*nowhere.safetensors'):
        timm.create_model('aucvt_raf_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'nowhere.safetensors')))
    path = tmp_path / 'plain.safetensors'
    save_file(timm.create_model('aucvt_raf_tiny').state_dict(), str(path))  # no aucvt_zoo facts in the header
    with pytest.raises(PretrainedWeightsError, match=r'size mismatch for au_head\.regions\.mouth\.fc\.weight'):
        timm.create_model('aucvt_openface_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(PretrainedWeightsError, match='size mismatch for head.weight'):
        # a flatten head sized for another grid: the wrong architecture, by shape alone
        timm.create_model('aucvt_raf_tiny', pretrained=True, global_pool='avg',
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_new_num_classes_keeps_backbone_and_au_branch(tmp_path, local_hub):
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    local_hub.add_commit(RAF_REPO, folder)
    adapted = timm.create_model('aucvt_raf_tiny', pretrained=True, num_classes=3).eval()
    source = model.state_dict()
    for key, value in adapted.state_dict().items():
        if key.startswith('head.'):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, source[key]), key
    expr, aus = outputs(adapted, X)
    assert expr.shape == (2, 3)
    assert torch.equal(aus, outputs(model, X)[1])


def test_environment_variables_in_a_fresh_process(tmp_path, monkeypatch):
    """HF_ENDPOINT / HF_HUB_CACHE as a user sets them select the server in a new process; its cache then serves
    an offline load."""
    model, folder = release(tmp_path, 'aucvt_raf_tiny')
    torch.save(X, tmp_path / 'x.pt')
    script = (
        'import torch, timm, aucvt_zoo\n'
        'm = timm.create_model("aucvt_raf_tiny", pretrained=True).eval()\n'
        f'x = torch.load({str(tmp_path / "x.pt")!r})\n'
        'with torch.no_grad(): print(repr(m.forward_with_aus(x)[1].sum().item()))\n')
    env = dict(hub_env('http://127.0.0.1:9', tmp_path / 'cache'), PYTHONPATH=str(ROOT),
               AUCVT_ZOO_MANIFEST=str(tmp_path / 'none.json'))
    with LocalHub() as server:
        server.add_commit(RAF_REPO, folder)
        env['HF_ENDPOINT'] = url = server.url
        online = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=env)
        assert online.returncode == 0, online.stderr
        assert server.count('GET', '/_lfs/') == 1
    assert float(online.stdout) == outputs(model, X)[1].sum().item()
    use_endpoint(monkeypatch, url, tmp_path / 'cache', offline=True)
    monkeypatch.setenv(hub.MANIFEST_ENV, str(tmp_path / 'none.json'))
    assert_same(model, timm.create_model('aucvt_raf_tiny', pretrained=True).eval(), X)


def test_manifest_lists_every_registered_checkpoint_honestly():
    manifest = hub.load_manifest(ROOT / 'weights' / 'manifest.json')
    entries = {e['model']: e for e in manifest['entries']}
    for name in aucvt_zoo.MODEL_NAMES:
        for name_with_tag, cfg in timm.models.get_arch_pretrained_cfgs(name).items():
            entry = entries[name_with_tag]
            assert entry['repo_id'] == cfg.hf_hub_id
            assert entry['file'] == 'model.safetensors'
            assert entry['license'] and entry['data_terms'] and entry['source']
    for entry in manifest['entries']:
        # "published" is a claim that needs a revision and a hash to verify against
        assert entry['status'] in ('planned', 'published', 'shipped')
        if entry['status'] == 'published':
            assert entry['revision'] and len(entry['sha256']) == 64
        if entry['status'] == 'shipped':  # inside the package: the file is here to check
            assert hub.sha256_file(ROOT / entry['package_file']) == entry['sha256']
        for metric in entry['metrics']:
            assert metric['protocol'] and (metric['value'] is None or metric.get('reported_by')
                                           or entry['status'] in ('published', 'shipped'))


@pytest.mark.parametrize('readme', ['weights/README.md', 'README.md'])
def test_readme_weights_table_matches_manifest(readme):
    text = (ROOT / readme).read_text(encoding='utf-8')
    missing = [line for line in convert.weights_table().splitlines() if line not in text]
    assert not missing, (f'{readme} lacks these lines of `python -m aucvt_zoo.convert table` (regenerate its '
                         f'"Weights" table from weights/manifest.json):\n' + '\n'.join(missing))
