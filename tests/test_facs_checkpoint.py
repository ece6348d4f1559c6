"""The demo checkpoint shipped inside the package: its hash, offline loading, and that it learnt something."""
import json
from pathlib import Path

import timm
import torch

import aucvt_zoo
from aucvt_zoo.data.faces import FacsFaces
from aucvt_zoo.hub import load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _entry():
    return next(e for e in load_manifest(ROOT / 'weights' / 'manifest.json')['entries']
                if e['model'] == 'aucvt_openface_tiny.facs')


def test_shipped_file_has_the_manifest_hash():
    entry = _entry()
    path = Path(aucvt_zoo.__file__).parent / entry['package_file']
    assert entry['status'] == 'shipped' and path.is_file()
    assert sha256_file(path) == entry['sha256'] and path.stat().st_size == entry['size']


def test_loads_offline_and_beats_chance_on_fresh_real_style_faces(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # no network, cold cache: the file is in the package
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path))
    model = timm.create_model('aucvt_openface_tiny.facs', pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**cfg)
    faces = FacsFaces(300, style='real', au_names=model.au_names, seed=12345, transform=transform)  # unseen seed
    images, labels = zip(*[(faces[i][0], faces[i][1]) for i in range(len(faces))])
    with torch.inference_mode():
        expression, aus = model.forward_with_aus(torch.stack(images))
    accuracy = (expression.argmax(1) == torch.tensor(labels)).float().mean().item()
    # chance is 1/6 over 6 balanced classes; 0.3 is about 6 binomial standard deviations above it (measured: 0.46)
    assert accuracy > 0.3, accuracy
    assert aus.shape == (300, 16) and model.au_names == aucvt_zoo.AU_SETS['openface16']


def test_manifest_says_what_it_is():
    entry = _entry()
    assert 'not a model of real expressions' in entry['training_data']
    assert 'make_facs_checkpoint.py' in entry['produce']
    measured = {m['name']: m['value'] for m in entry['metrics']}
    assert measured['accuracy'] > 1 / 6 and json.dumps(entry)
