"""Weights in: the Hub namespace, the pretrained configs every zoo model shares, and model building with clear errors.

Loading goes through timm's own path (`pretrained_cfg['hf_hub_id']` -> `huggingface_hub.hf_hub_download` ->
`model.safetensors`); this module only names the repos and turns the failures a user can meet (no network, an
unpublished repo, a corrupt or mismatched file) into errors that say what was tried and what to do.
"""
import os
from typing import Any, Callable, Dict, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, resolve_pretrained_cfg

from .labels import EXPRESSIONS

__all__ = [
    'HUB_NAMESPACE', 'NAMESPACE_ENV', 'PAPER_ID', 'PretrainedWeightsError', 'hub_repo_id', 'zoo_cfg',
    'zoo_default_cfgs', 'build_model',
]

# One namespace for every repo of the zoo; mirrors and forks override it before importing aucvt_zoo.
NAMESPACE_ENV = 'AUCVT_ZOO_HUB_NAMESPACE'
HUB_NAMESPACE = os.environ.get(NAMESPACE_ENV, 'aucvt-zoo')
PAPER_ID = 'arXiv:2207.09777'

ModelT = TypeVar('ModelT', bound=nn.Module)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be fetched or do not fit the model; the message says which and what to do."""


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


def _is_fetch_error(err: BaseException) -> bool:
    """True for the failures of fetching a file: Hub errors, offline mode, network errors."""
    module = type(err).__module__
    return module.startswith(('huggingface_hub', 'httpx', 'requests', 'urllib3')) or isinstance(
        err, (ConnectionError, TimeoutError))


def build_model(
        model_cls: Callable[..., ModelT],
        variant: str,
        pretrained: bool,
        **kwargs,
) -> ModelT:
    """`timm.models.build_model_with_cfg` with pretrained-weight failures reported in the zoo's terms."""
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except Exception as err:
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        repo, source = cfg.hf_hub_id, cfg.file
        if _is_fetch_error(err):
            raise PretrainedWeightsError(
                f'Could not fetch the pretrained weights of {variant!r} from the Hugging Face Hub repo {repo!r} '
                f'({type(err).__name__}: {_first_line(err)}). Either the repo is not published yet, this machine '
                f'is offline, or its cache is cold. Ways out: load a local file with '
                f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))"
                f', or point HF_ENDPOINT at a mirror that has the repo (and set HF_HUB_OFFLINE=1 only once the '
                f'cache is warm).') from err
        if 'Error(s) in loading state_dict' in str(err) or 'size mismatch' in str(err):
            raise PretrainedWeightsError(
                f'The pretrained weights {source or repo!r} do not fit {variant!r} '
                f'(wrong AU set, num_classes or architecture?). {err}') from err
        if 'safetensor' in type(err).__name__.lower() or 'header' in str(err).lower():
            raise PretrainedWeightsError(
                f'The weight file {source or repo!r} for {variant!r} is not a readable safetensors file '
                f'({_first_line(err)}); it may be truncated or corrupt: delete it (or its Hub cache entry) and fetch '
                f'it again.') from err
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
