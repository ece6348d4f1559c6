"""Weights in: the Hub namespace, the pretrained configs every zoo model shares, and model building with clear errors.

Loading goes through timm's own path (`pretrained_cfg['hf_hub_id']` -> `huggingface_hub.hf_hub_download` ->
`model.safetensors`); this module names the repos, verifies what was fetched, and turns the failures a user can
meet (no network, an unpublished repo, a corrupt, tampered or mismatched file) into errors that say what was tried
and what to do.

For a Hub download `build_model` fetches the weight file itself first (same call, same cache as timm), then:
- checks its sha256 when the weights manifest (`weights/manifest.json`, or the file named by
  `AUCVT_ZOO_MANIFEST`) records one for that repo, revision and file;
- reads the zoo's facts stored in the safetensors header (architecture, AU names) to refuse a file made for
  another model;
- pins timm's own download to the commit it resolved, so the file timm loads is the file that was verified
  (`model.pretrained_cfg['hf_hub_id']` then reads `<repo>@<commit>`), and a warm cache needs one request
  (the revision look-up) per load, none with `HF_HUB_OFFLINE=1`.
"""
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, resolve_pretrained_cfg

from .labels import EXPRESSIONS

__all__ = [
    'HUB_NAMESPACE', 'NAMESPACE_ENV', 'MANIFEST_ENV', 'PAPER_ID', 'WEIGHTS_FILE', 'PretrainedWeightsError',
    'WeightsIntegrityError', 'hub_repo_id', 'zoo_cfg', 'zoo_default_cfgs', 'build_model', 'manifest_path',
    'load_manifest', 'known_sha256', 'sha256_file', 'read_weight_facts',
]

# One namespace for every repo of the zoo; mirrors and forks override it before importing aucvt_zoo.
NAMESPACE_ENV = 'AUCVT_ZOO_HUB_NAMESPACE'
HUB_NAMESPACE = os.environ.get(NAMESPACE_ENV, 'aucvt-zoo')
PAPER_ID = 'arXiv:2207.09777'
# A manifest to use instead of the repository's weights/manifest.json (mirrors, installed packages, tests).
MANIFEST_ENV = 'AUCVT_ZOO_MANIFEST'
WEIGHTS_FILE = 'model.safetensors'
# Keys of the zoo's facts in a safetensors header (string -> string, as the format requires).
META_ARCHITECTURE = 'aucvt_zoo.architecture'
META_AU_NAMES = 'aucvt_zoo.au_names'
META_NUM_CLASSES = 'aucvt_zoo.num_classes'

_COMMIT = re.compile(r'^[0-9a-f]{40}$')

ModelT = TypeVar('ModelT', bound=nn.Module)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be fetched or do not fit the model; the message says which and what to do."""


class WeightsIntegrityError(PretrainedWeightsError):
    """A downloaded weight file does not have the sha256 the weights manifest records for it."""


def hub_repo_id(name_with_tag: str) -> str:
    """The Hub repo of a registered model and tag, e.g. 'aucvt_raf.lsd' -> '<namespace>/aucvt_raf.lsd'."""
    return f'{HUB_NAMESPACE}/{name_with_tag}'


def zoo_cfg(**kwargs) -> Dict[str, Any]:
    """The pretrained-config fields every zoo model shares: aligned 112x112 RGB faces scaled to [-1, 1]."""
    return dict(
        input_size=(3, 112, 112),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation='bilinear',
        crop_pct=1.0,
        crop_mode='center',
        num_classes=len(EXPRESSIONS),
        label_names=EXPRESSIONS,
        license='apache-2.0',
        paper_name='AU-Supervised Convolutional Vision Transformers for Synthetic Facial Expression Recognition',
        paper_ids=PAPER_ID,
    ) | kwargs


def zoo_default_cfgs(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """timm's `generate_default_cfgs`, with each 'name.tag' pointed at its repo in the zoo's Hub namespace."""
    return generate_default_cfgs({k: dict(v, hf_hub_id=v.get('hf_hub_id', hub_repo_id(k))) for k, v in cfgs.items()})


# --- the weights manifest -----------------------------------------------------------------------------------------
def manifest_path() -> Path:
    """The weights manifest in use: `$AUCVT_ZOO_MANIFEST`, else `weights/manifest.json` beside the package."""
    override = os.environ.get(MANIFEST_ENV)
    return Path(override) if override else Path(__file__).resolve().parent / 'weights' / 'manifest.json'


def load_manifest(path: Optional[Path] = None) -> Dict[str, Any]:
    """The manifest as a dict with an `entries` list; an absent file is an empty manifest (nothing to verify)."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        return {'entries': []}
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as err:
        raise PretrainedWeightsError(
            f'The weights manifest {str(path)!r} is not readable JSON ({err}). Fix or restore it (git checkout '
            f'weights/manifest.json), or point {MANIFEST_ENV} at a good copy.') from err
    if not isinstance(manifest.get('entries'), list):
        raise PretrainedWeightsError(f'The weights manifest {str(path)!r} has no "entries" list.')
    return manifest


def known_sha256(
        repo_id: str,
        filename: str,
        revisions: Tuple[str, ...],
        manifest: Optional[Dict] = None,
) -> Optional[str]:
    """The sha256 the manifest records for `filename` of `repo_id` at any of `revisions` (a ref or its commit)."""
    manifest = manifest if manifest is not None else load_manifest()
    for entry in manifest['entries']:
        if (entry.get('repo_id') == repo_id and entry.get('file', WEIGHTS_FILE) == filename
                and entry.get('sha256') and (entry.get('revision') or 'main') in revisions):
            return entry['sha256'].lower()
    return None


def sha256_file(path: os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_weight_facts(path: os.PathLike) -> Dict[str, Any]:
    """The zoo's facts in a safetensors header: architecture, au_names (tuple), num_classes; {} for other files.

    Raises:
        PretrainedWeightsError: the file is not a readable safetensors file (truncated, corrupt, not safetensors).
    """
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise PretrainedWeightsError(
            f'The weight file {str(path)!r} is not a readable safetensors file ({_first_line(err)}); it may be '
            f'truncated or corrupt: delete it (or its Hub cache entry) and fetch it again.') from err
    facts: Dict[str, Any] = {}
    if META_ARCHITECTURE in meta:
        facts['architecture'] = meta[META_ARCHITECTURE]
    if META_AU_NAMES in meta:
        facts['au_names'] = tuple(a for a in meta[META_AU_NAMES].split(',') if a)
    if META_NUM_CLASSES in meta:
        facts['num_classes'] = int(meta[META_NUM_CLASSES])
    return facts


# --- building -----------------------------------------------------------------------------------------------------
def _is_fetch_error(err: BaseException) -> bool:
    """True for the failures of fetching a file: Hub errors, offline mode, network errors."""
    module = type(err).__module__
    return module.startswith(('huggingface_hub', 'httpx', 'requests', 'urllib3')) or isinstance(
        err, (ConnectionError, TimeoutError))


def _fetch_error(variant: str, repo: str, err: BaseException) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f'Could not fetch the pretrained weights of {variant!r} from the Hugging Face Hub repo {repo!r} '
        f'({type(err).__name__}: {_first_line(err)}). Either the repo is not published yet, this machine '
        f'is offline, or its cache is cold. Ways out: load a local file with '
        f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))"
        f', or point HF_ENDPOINT at a mirror that has the repo (and set HF_HUB_OFFLINE=1 only once the '
        f'cache is warm).')


def _weights_source(variant: str, kwargs: Dict[str, Any]) -> Tuple[str, Any, Any]:
    """Where timm will load the weights from: ('hf-hub', '<repo>[@rev]', filename), ('file', path, None), ..."""
    from timm.models._builder import _resolve_pretrained_source  # the precedence timm itself applies
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from == 'hf-hub':
        if isinstance(location, (tuple, list)):
            return load_from, location[0], location[1]
        return load_from, location, WEIGHTS_FILE
    return load_from, location, None


def _prefetch(variant: str, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """Fetch and verify the weight file before timm loads it; returns (kwargs for timm, the file's facts, source)."""
    load_from, location, filename = _weights_source(variant, kwargs)
    if load_from == 'file':
        if not Path(location).is_file():
            raise PretrainedWeightsError(
                f'No weight file at {str(location)!r} (pretrained_cfg_overlay file=...) for {variant!r}: check the '
                f'path, or drop the overlay to load the weights from the Hub.')
        if str(location).endswith('.safetensors'):
            return kwargs, read_weight_facts(location), str(location)
    if load_from != 'hf-hub' or not filename.endswith('.safetensors'):
        return kwargs, {}, str(location)

    from huggingface_hub import hf_hub_download
    from timm.models._hub import hf_split
    repo, revision = hf_split(location)
    try:
        path = hf_hub_download(repo, filename, revision=revision, cache_dir=kwargs.get('cache_dir'))
    except Exception as err:
        if _is_fetch_error(err):
            raise _fetch_error(variant, location, err) from err
        raise
    snapshot = Path(path).parent
    commit = snapshot.name if snapshot.parent.name == 'snapshots' and _COMMIT.match(snapshot.name) else None
    expected = known_sha256(repo, filename, tuple(r for r in (revision or 'main', commit) if r))
    if expected:
        actual = sha256_file(path)
        if actual != expected:
            raise WeightsIntegrityError(
                f'{filename} of {repo!r} (revision {revision or "main"}, commit {commit}) has sha256 {actual}, but '
                f'the weights manifest {str(manifest_path())!r} records {expected}. The file was corrupted, '
                f'truncated or replaced. Delete the cached copy {str(Path(path).resolve())!r} and load again; if the '
                f'mismatch persists, the repo changed: pin the revision the manifest names, or report it.')
    facts = read_weight_facts(path)
    if commit and revision != commit:
        # timm's own hf_hub_download then finds the verified snapshot without asking the Hub again
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(kwargs.get('pretrained_cfg_overlay') or {},
                                                          hf_hub_id=f'{repo}@{commit}'))
    return kwargs, facts, f'{repo}@{commit or revision or "main"}/{filename}'


def _facts_mismatch(variant: str, model: Optional[nn.Module], facts: Dict[str, Any], source: str) -> Optional[str]:
    """What makes the file's facts (from its header) incompatible with the model, or None."""
    architecture = facts.get('architecture')
    if architecture and architecture != variant:
        return (f'{source} holds weights of {architecture!r}, not {variant!r}: create '
                f'timm.create_model({architecture!r}, ...) instead, or load a file made for {variant!r}.')
    if model is not None and 'au_names' in facts:
        ours = tuple(getattr(model, 'au_names', ()))
        if facts['au_names'] != ours:
            return (f'{source} has AU heads for {", ".join(facts["au_names"]) or "no AUs"}, but this {variant!r} '
                    f'predicts {", ".join(ours) or "no AUs"} (wrong AU set: pass au_labels matching the file, or '
                    f'use weights trained for this AU set).')
    return None


def build_model(
        model_cls: Callable[..., ModelT],
        variant: str,
        pretrained: bool,
        **kwargs,
) -> ModelT:
    """`timm.models.build_model_with_cfg` with pretrained weights verified and their failures in the zoo's terms."""
    facts: Dict[str, Any] = {}
    source = ''
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('hf_hub_id') and 'file' not in overlay:
        # a Hub repo the caller names beats a file the registry ships (timm would prefer the file)
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(overlay, file=None))
    if pretrained:
        kwargs, facts, source = _prefetch(variant, kwargs)
        mismatch = _facts_mismatch(variant, None, facts, source)
        if mismatch:
            raise PretrainedWeightsError(mismatch)
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except Exception as err:
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        repo, source = cfg.hf_hub_id, source or cfg.file or cfg.hf_hub_id
        if _is_fetch_error(err):
            raise _fetch_error(variant, repo, err) from err
        if 'Error(s) in loading state_dict' in str(err) or 'size mismatch' in str(err):
            held = f' The file holds AU heads for {", ".join(facts["au_names"])}.' if facts.get('au_names') else ''
            raise PretrainedWeightsError(
                f'The pretrained weights {source!r} do not fit {variant!r} '
                f'(wrong AU set, num_classes or architecture?).{held} {err}') from err
        if 'safetensor' in type(err).__name__.lower() or 'header' in str(err).lower():
            raise PretrainedWeightsError(
                f'The weight file {source!r} for {variant!r} is not a readable safetensors file '
                f'({_first_line(err)}); it may be truncated or corrupt: delete it (or its Hub cache entry) and fetch '
                f'it again.') from err
        raise
    mismatch = _facts_mismatch(variant, model, facts, source) if pretrained else None
    if mismatch:
        raise PretrainedWeightsError(mismatch)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
