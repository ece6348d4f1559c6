"""Weights out: turn original checkpoints into Hub releases of the zoo's models.

    python -m aucvt_zoo.convert evolve backbone_ir50_ms1m_epoch120.pth --out out/ir50.ms1m
    python -m aucvt_zoo.convert evolve backbone_ir50_ms1m_epoch120.pth --target embedding --out out/ir50_embedding
    python -m aucvt_zoo.convert authors checkpoint_best.pth --out out/aucvt_raf_released.lsd \
        --entry aucvt_raf_released.lsd
    python -m aucvt_zoo.convert checkpoint runs/aucvt_openface --out out/aucvt_openface.lsd \
        --push aucvt-zoo/aucvt_openface.lsd
    python -m aucvt_zoo.convert table          # the README "Weights" table, from weights/manifest.json

Inputs:
- face.evoLVe IR-50 (`input_layer.*`, `body.{0..23}.res_layer|shortcut_layer.*`, `output_layer.*`): to an `ir50`
  release (no expression head: the MS-Celeb weights never had one) or to the truncated CNN embedding of the CVT
  models (units 0-20, a safetensors file for `CVT.load_trunk_state_dict`).
- the authors' training checkpoints (github msy1412/ABAW4; layout in docs/weights.md): `cnn.*` + `vit.*`, with or
  without DataParallel's `module.`, to the released-code configuration (`cvt_ir50_released`,
  `aucvt_raf_released` for the 7-region AU heads, `aucvt_openface_released` for the upper/lower heads).
- the zoo's own training output: a Hub-format folder (config.json + model.safetensors) or a torch checkpoint whose
  state dict sits under `model` / `state_dict` / `model_ema`.

Output: a folder in timm's Hub format written with `timm.models.save_for_hf` (config.json with architecture,
num_classes, model_args, pretrained_cfg with the label names, and the AU facts; model.safetensors, whose header also
records architecture and AU names so a mismatched load is refused; README.md model card from
weights/model_card.md), plus the sha256 of the weights and a manifest entry to paste into weights/manifest.json.

Pickles: `.pth` files are read with `torch.load(weights_only=True)`, which refuses arbitrary objects;
`argparse.Namespace` (the training arguments the authors' code saves) is allowed since it only holds values.
Anything else needs `--trust-pickle`, for files from a source you trust: unpickling can run code.
"""
import argparse
import json
import os
import pickle
import re
import string
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .hub import (
    META_ARCHITECTURE, META_AU_NAMES, META_NUM_CLASSES, PAPER_ID, WEIGHTS_FILE, load_manifest, manifest_path,
    sha256_file,
)
from .labels import EXPRESSIONS, FACS_NAMES
from .models.ir50 import remap_evolve_state_dict

__all__ = [
    'ConversionError', 'load_checkpoint', 'unwrap_state_dict', 'evolve_units', 'convert_evolve', 'convert_authors',
    'convert_zoo_checkpoint', 'build_converted', 'save_release', 'push_release', 'weights_table', 'main',
]

# The authors' AU heads -> our region names (labels.REGION_LAYOUTS), per their layout.
AUTHORS_REGIONS_7 = {
    'AU11': 'eye_left', 'AU12': 'between_brows', 'AU13': 'eye_right', 'AU21': 'cheek_left', 'AU22': 'nose',
    'AU23': 'cheek_right', 'AU3': 'mouth',
}
AUTHORS_REGIONS_2 = {('norm_AU_up', 'upperAU_head'): 'upper', ('norm_AU_low', 'lowerAU_head'): 'lower'}
# Built by the authors' code but never used in its forward pass (the 100352 -> 512 `output_layer` alone is 51M
# parameters): dropped and reported.
AUTHORS_UNUSED = ('norm.', 'vit.pools.', 'vit.pos_block.', 'vit.output_layer.')
# The authors' attention heads are 32 wide (16 heads at width 512).
AUTHORS_HEAD_DIM = 32
_IR50_LAYERS = (3, 4, 14, 3)
_CARD_TEMPLATE = Path(__file__).resolve().parent / 'weights' / 'model_card.md'


class ConversionError(ValueError):
    """A checkpoint cannot be converted: the message says what was found, what was expected and what to do."""


# --- reading ------------------------------------------------------------------------------------------------------
def load_checkpoint(path: os.PathLike, trust_pickle: bool = False) -> Dict[str, Any]:
    """Read a `.safetensors` file or a torch checkpoint without running pickled code (unless trusted).

    Raises:
        ConversionError: the file is missing, unreadable, or needs unpickling of objects `weights_only` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f'No checkpoint file at {str(path)!r}.')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:
            raise ConversionError(f'{str(path)!r} is not a readable safetensors file ({err}).') from err
    if trust_pickle:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        # argparse.Namespace holds plain values; the authors' code saves its training arguments as one
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        if not isinstance(err, pickle.UnpicklingError):
            raise ConversionError(f'{str(path)!r} is not a readable torch checkpoint ({_first_line(err)}).') from err
        raise ConversionError(
            f'{str(path)!r} contains pickled Python objects that torch.load(weights_only=True) refuses to build '
            f'({_first_line(err)}). Unpickling can run arbitrary code, so the converter does not do it by default. '
            f'If you trust where this file comes from, pass --trust-pickle (trust_pickle=True); otherwise ask its '
            f'author for the state dict alone (torch.save(model.state_dict(), ...) or a .safetensors file).') from err


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: under `model` / `state_dict` / `model_ema` if wrapped, without `module.`."""
    state_dict = checkpoint
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if isinstance(checkpoint.get(wrapper), dict):
            state_dict = checkpoint[wrapper]
            break
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(
            f'Found no tensors in the checkpoint (top-level keys: {_preview(checkpoint)}); expected a state dict, '
            f'possibly under "model" or "state_dict".')
    if all(k.startswith('module.') for k in tensors):
        tensors = {k[len('module.'):]: v for k, v in tensors.items()}
    return tensors


# --- face.evoLVe IR -----------------------------------------------------------------------------------------------
def evolve_units(
        state_dict: Dict[str, torch.Tensor],
        what: str = 'checkpoint',
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Units per stage and stage widths of a face.evoLVe IR state dict (`input_layer.*`, `body.N.*` keys).

    A stage starts at unit 0 and at every unit with a projection shortcut (`shortcut_layer`), i.e. where the width
    changes, as in face.evoLVe's `get_block`.

    Raises:
        ConversionError: the keys are another IR-50 layout (InsightFace, AdaFace), or units are missing.
    """
    keys = list(state_dict)
    if not any(k.startswith('input_layer.') for k in keys) or not any(k.startswith('body.') for k in keys):
        found = _layout_guess(keys)
        raise ConversionError(
            f'The {what} is not a face.evoLVe IR backbone: found {found}. Expected face.evoLVe names '
            f'`input_layer.{{0,1,2}}.*`, `body.{{0..23}}.res_layer.{{0..4}}.*`, `body.N.shortcut_layer.{{0,1}}.*` '
            f'(IR-50 from github ZhaoJ9014/face.evoLVe). InsightFace (arcface_torch) and AdaFace IR-50 weights use '
            f'another unit layout (BN, conv, BN, PReLU, conv, BN) and cannot be mapped onto this architecture.')
    units: Dict[int, set] = {}
    for key in keys:
        match = re.match(r'body\.(\d+)\.(res_layer|shortcut_layer)\.(\d+)\.', key)
        if match:
            units.setdefault(int(match.group(1)), set()).add((match.group(2), int(match.group(3))))
        elif key.startswith('body.'):
            raise ConversionError(f'Unexpected key {key!r} in the {what}: face.evoLVe units only hold '
                                  f'res_layer.{{0..4}} and shortcut_layer.{{0,1}}.')
    indices = sorted(units)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ConversionError(f'The {what} has face.evoLVe units {_ranges(indices)} but misses units '
                              f'{_ranges(missing)}; a partial backbone cannot be converted.')
    for index in indices:
        res = sorted(i for kind, i in units[index] if kind == 'res_layer')
        if res != [0, 1, 2, 3, 4]:
            raise ConversionError(
                f'face.evoLVe unit body.{index} of the {what} has res_layer modules {res}; expected [0, 1, 2, 3, 4] '
                f'(BN, conv3x3, PReLU, conv3x3, BN). A res_layer with 6 modules is the AdaFace/InsightFace '
                f'"BasicBlockIR" (BN, conv, BN, PReLU, conv, BN), a different architecture.')
    starts = [0] + [i for i in indices[1:] if any(kind == 'shortcut_layer' for kind, _ in units[i])]
    layers = tuple(b - a for a, b in zip(starts, starts[1:] + [len(indices)]))
    channels = tuple(int(state_dict[f'body.{s}.res_layer.1.weight'].shape[0]) for s in starts)
    return layers, channels


def convert_evolve(
        state_dict: Dict[str, torch.Tensor],
        target: str = 'ir50',
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Map a face.evoLVe IR state dict onto an `IResNet` ('ir50', 'ir50_tiny') or the CVT embedding ('embedding').

    Returns:
        The state dict for the target (for 'embedding': the keys of `CVT.trunk`, units 0-20 of IR-50) and a report
        with the architecture, model_args, and the dropped keys.
    """
    layers, channels = evolve_units(state_dict)
    report: Dict[str, Any] = dict(source_layout='face.evoLVe IR', units=sum(layers), layers=layers)
    if target == 'embedding':
        if layers[:3] != _IR50_LAYERS[:3]:
            raise ConversionError(
                f'The CVT embedding is IR-50 units 0-20 (stages of 3, 4, 14 units); the checkpoint has stages of '
                f'{"/".join(map(str, layers))} units.')
        keep = layers[:3]
        out, dropped = remap_evolve_state_dict(state_dict, keep)
        report.update(architecture='ir50 embedding (CVT trunk)', model_args=dict(trunk_layers=keep),
                      dropped=sorted(dropped))
        return out, report
    expected = {'ir50': _IR50_LAYERS}.get(target)
    if expected and layers != expected:
        raise ConversionError(
            f'{target} has stages of {"/".join(map(str, expected))} units; the checkpoint has '
            f'{"/".join(map(str, layers))} ({sum(layers)} units: another IR depth, or a truncated backbone). '
            f'Use --target embedding for a CVT trunk.')
    out, dropped = remap_evolve_state_dict(state_dict, layers)
    report.update(architecture=target, model_args=dict(layers=layers, channels=channels, num_classes=0),
                  dropped=sorted(dropped))
    return out, report


# --- the authors' AU-CVT ------------------------------------------------------------------------------------------
def convert_authors(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Map a state dict of the authors' training code onto the released-code configuration of `CVT`.

    Returns:
        Our state dict and a report: architecture (`cvt_ir50_released`, `aucvt_raf_released` or
        `aucvt_openface_released`), model_args read from the tensor shapes, dropped (never-used) keys.
    """
    keys = list(state_dict)
    if not any(k.startswith('cnn.') for k in keys) or not any(k.startswith('vit.') for k in keys):
        raise ConversionError(
            f'Not a checkpoint of the authors\' AU-CVT code: found {_layout_guess(keys)}. Expected modules `cnn.*` '
            f'(face.evoLVe IR-50 units 0-20) and `vit.*` (patch_embed, pos_embed, transformers.{{0,1}}.blocks, '
            f'norm, head, AU heads), optionally under "model" and with a `module.` prefix.')
    cnn = {k[len('cnn.'):]: v for k, v in state_dict.items() if k.startswith('cnn.')}
    layers, channels = evolve_units(cnn, what='`cnn` module')
    if len(layers) != 3:
        raise ConversionError(
            f'The authors\' `cnn` is IR-50 cut after its third stage (units 0-20); found {len(layers)} stages of '
            f'{"/".join(map(str, layers))} units.')
    out, _ = remap_evolve_state_dict(cnn, layers, prefix='trunk.')
    dropped = sorted(k for k in keys if k.startswith(AUTHORS_UNUSED))
    unknown = []
    has7 = any(k.startswith('vit.head_AU') for k in keys)
    has2 = any(k.startswith(('vit.upperAU_head', 'vit.lowerAU_head')) for k in keys)
    if has7 and has2:
        raise ConversionError('The checkpoint has both 7-region (head_AU*) and upper/lower AU heads; expected one.')
    blocks: Dict[int, set] = {}
    for key, value in state_dict.items():
        if key.startswith('cnn.') or key.startswith(AUTHORS_UNUSED):
            continue
        name = key[len('vit.'):] if key.startswith('vit.') else None
        if name is None:
            unknown.append(key)
            continue
        match = re.match(r'transformers\.(\d+)\.blocks\.(\d+)\.((?:norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)'
                         r'\.(?:weight|bias))$', name)
        region = re.match(r'(norm|head)_(AU\d+)\.(weight|bias)$', name)
        if match:
            stage, block, rest = int(match.group(1)), int(match.group(2)), match.group(3)
            blocks.setdefault(stage, set()).add(block)
            out[f'stages.{stage}.blocks.{block}.{rest}'] = value
        elif name.startswith('patch_embed.'):
            out[name] = value
        elif name == 'pos_embed':
            n, tokens, dim = value.shape
            side = int(round(tokens ** 0.5))
            if side * side != tokens:
                raise ConversionError(f'vit.pos_embed has {tokens} tokens, not a square lattice.')
            # the authors add it to the 14x14 map flattened row-major; ours is kept as the (1, 14, 14, C) map
            out['pos_embed'] = value.reshape(n, side, side, dim)
        elif name.startswith('norm.'):
            out['fc_norm.' + name[len('norm.'):]] = value
        elif name.startswith('head.'):
            out[name] = value
        elif region and region.group(2) in AUTHORS_REGIONS_7:
            part = 'norm' if region.group(1) == 'norm' else 'fc'
            out[f'au_head.regions.{AUTHORS_REGIONS_7[region.group(2)]}.{part}.{region.group(3)}'] = value
        else:
            for (norm, head), ours in AUTHORS_REGIONS_2.items():
                if name.startswith(norm + '.') or name.startswith(head + '.'):
                    part = 'norm' if name.startswith(norm + '.') else 'fc'
                    out[f'au_head.regions.{ours}.{part}.{name.rsplit(".", 1)[1]}'] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ConversionError(
            f'Keys the authors\' layout does not have: {_preview(unknown)}. Expected cnn.*, vit.patch_embed, '
            f'vit.pos_embed, vit.transformers.S.blocks.B.*, vit.norm, vit.head, AU heads (vit.norm_AU*/head_AU* or '
            f'norm_AU_up/low + upperAU_head/lowerAU_head), and the unused {", ".join(AUTHORS_UNUSED)}.')
    for required in ('patch_embed.weight', 'pos_embed', 'fc_norm.weight', 'head.weight'):
        if required not in out:
            raise ConversionError(
                f'The checkpoint has no {_authors_name(required)}; the authors\' model always has it.')
    stages = sorted(blocks)
    if stages != list(range(len(stages))) or any(sorted(blocks[s]) != list(range(len(blocks[s]))) for s in stages):
        found = {s: sorted(b) for s, b in blocks.items()}
        raise ConversionError(f'Transformer blocks are not numbered 0..n-1 per stage: found {found}.')
    dim = int(out['patch_embed.weight'].shape[0])
    model_args = dict(
        trunk_layers=layers, trunk_channels=channels,
        embed_dims=(dim,) * len(stages), depths=tuple(len(blocks[s]) for s in stages),
        num_heads=(max(1, dim // AUTHORS_HEAD_DIM),) * len(stages),
        mlp_ratio=out['stages.0.blocks.0.mlp.fc1.weight'].shape[0] / dim,
        num_classes=int(out['head.weight'].shape[0]),
    )
    architecture = 'aucvt_raf_released' if has7 else 'aucvt_openface_released' if has2 else 'cvt_ir50_released'
    return out, dict(source_layout='authors (msy1412/ABAW4)', architecture=architecture, model_args=model_args,
                     dropped=dropped)


def _authors_name(ours: str) -> str:
    return {'patch_embed.weight': 'vit.patch_embed', 'pos_embed': 'vit.pos_embed', 'fc_norm.weight': 'vit.norm',
            'head.weight': 'vit.head'}[ours]


# --- the zoo's own checkpoints ------------------------------------------------------------------------------------
def convert_zoo_checkpoint(
        source: os.PathLike,
        model_name: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        trust_pickle: bool = False,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint of the zoo's trainer: a Hub-format folder, a .safetensors file or a torch checkpoint.

    The architecture comes from `model_name`, else config.json / the safetensors header / the checkpoint's `arch`.
    """
    source = Path(source)
    config: Dict[str, Any] = {}
    if source.is_dir():
        if (source / 'config.json').is_file():
            config = json.loads((source / 'config.json').read_text(encoding='utf-8'))
        candidates = [source / WEIGHTS_FILE] + sorted(source.glob('*.safetensors')) + sorted(source.glob('*.pt*'))
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise ConversionError(f'{str(source)!r} holds no model.safetensors, *.safetensors or *.pt(h) file.')
        source = weights
    checkpoint = load_checkpoint(source, trust_pickle=trust_pickle)
    if source.suffix == '.safetensors':
        from .hub import read_weight_facts
        config.setdefault('architecture', read_weight_facts(source).get('architecture'))
    name = model_name or config.get('architecture') or checkpoint.get('arch') or checkpoint.get('architecture')
    if not name:
        raise ConversionError(
            f'{str(source)!r} does not say which model it holds (no config.json "architecture", no "arch" key); '
            f'pass --model NAME.')
    args = dict(config.get('model_args') or checkpoint.get('model_args') or {})
    args.update(model_args or {})
    return unwrap_state_dict(checkpoint), dict(source_layout='aucvt_zoo', architecture=name, model_args=args,
                                               dropped=[])


# --- building, saving, publishing ---------------------------------------------------------------------------------
def build_converted(state_dict: Dict[str, torch.Tensor], report: Dict[str, Any]) -> nn.Module:
    """Create the report's architecture and load the converted state dict with strict=True.

    Raises:
        ConversionError: missing/unexpected keys or shape mismatches, listed by name.
    """
    import timm  # the zoo's models are registered: importing aucvt_zoo.convert imported aucvt_zoo

    model = timm.create_model(report['architecture'], pretrained=False, **report.get('model_args', {}))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f'{k}: found {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}'
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        au = getattr(model, 'au_names', ())
        problems = [f'missing {_preview(missing)}' if missing else '',
                    f'unexpected {_preview(unexpected)}' if unexpected else '',
                    f'shape mismatches: {"; ".join(shapes[:6])}' if shapes else '']
        facts = [f'{k}={v}' for k, v in report.get('model_args', {}).items()] + ([f'AUs {",".join(au)}'] if au else [])
        raise ConversionError(
            f'The converted weights do not fit {report["architecture"]}'
            f'{" (" + "; ".join(facts) + ")" if facts else ""}: ' + '; '.join(p for p in problems if p) + '.')
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_release(
        model: nn.Module,
        out_dir: os.PathLike,
        entry: Optional[Dict[str, Any]] = None,
        source: str = '',
        dropped: Sequence[str] = (),
        card_template: Optional[os.PathLike] = None,
) -> Dict[str, Any]:
    """Write `model` as a Hub folder (config.json, model.safetensors, README.md) with timm's `save_for_hf`.

    Args:
        model: the model holding the weights.
        out_dir: the folder to write (created).
        entry: the model's weights-manifest entry (licence, data terms, metrics) for the card; None for defaults.
        source: what the weights were converted from, for the card.
        dropped: source keys that were not carried over, for the card.
        card_template: model-card template (default weights/model_card.md).

    Returns:
        A manifest entry for the written file: repo_id, file, sha256, size and the card facts.
    """
    from safetensors.torch import load_file
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    architecture = model.pretrained_cfg['architecture']
    au_names = list(getattr(model, 'au_names', ()))
    model_config: Dict[str, Any] = {}
    if au_names:
        au_head = getattr(model, 'au_head', None)
        model_config.update(
            au_names=au_names,
            au_descriptions={a: FACS_NAMES[a] for a in au_names},
            au_layout=getattr(au_head, 'layout', None),
            au_regions={name: list(aus) for name, aus in getattr(au_head, 'region_aus', {}).items()},
        )
    save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True)
    # record what the tensors are for in the file itself, so a load into the wrong model is refused up front
    weights = out_dir / WEIGHTS_FILE
    save_safetensors(load_file(str(weights)), weights, metadata={
        'format': 'pt', META_ARCHITECTURE: architecture, META_AU_NAMES: ','.join(au_names),
        META_NUM_CLASSES: str(model.num_classes)})
    sha256 = sha256_file(weights)
    entry = dict(entry or {})
    tag = entry.get('model') or f'{architecture}.{model.pretrained_cfg.get("tag") or "converted"}'
    result = dict(
        model=tag, architecture=architecture, repo_id=entry.get('repo_id', f'<namespace>/{tag}'),
        revision=entry.get('revision'), file=WEIGHTS_FILE, sha256=sha256, size=weights.stat().st_size,
        source=source or entry.get('source', ''), dropped=list(dropped),
    )
    card = render_card(model, entry, result, card_template)
    (out_dir / 'README.md').write_text(card, encoding='utf-8')
    return result


def render_card(model: nn.Module, entry: Dict[str, Any], result: Dict[str, Any],
                template: Optional[os.PathLike] = None) -> str:
    """The model card: YAML metadata (licence, datasets, model-index with the entry's metrics) + the template."""
    from huggingface_hub import EvalResult, ModelCardData

    template = Path(template or _CARD_TEMPLATE)
    if not template.is_file():
        raise ConversionError(f'No model-card template at {str(template)!r}; run from a source checkout of aucvt_zoo '
                              f'or pass --card-template.')
    cfg = model.pretrained_cfg
    metrics = entry.get('metrics') or []
    eval_results = [
        EvalResult(task_type='image-classification', task_name='Facial expression recognition',
                   dataset_type=m.get('dataset_type', 'custom'), dataset_name=m['dataset'],
                   dataset_split=m.get('split'), metric_type=m['type'], metric_name=m.get('name', m['type']),
                   metric_value=m['value'])
        for m in metrics if m.get('value') is not None and not m.get('reported_by')]  # measured on this file only
    license_name = {'license_name': entry['license_name']} if entry.get('license_name') else {}
    data = ModelCardData(
        license=entry.get('license') or cfg.get('license') or 'apache-2.0', library_name='timm', **license_name,
        pipeline_tag='image-classification', datasets=entry.get('datasets') or None,
        tags=['image-classification', 'timm', 'facial-expression-recognition', 'action-units', 'aucvt_zoo'],
        model_name=result['model'], eval_results=eval_results or None,
    )
    au_names = getattr(model, 'au_names', ())
    metric_lines = '\n'.join(
        f'| {m.get("name", m["type"])} | {m["dataset"]}{" (" + m["split"] + ")" if m.get("split") else ""} | '
        f'{_metric_value(m)} | {m.get("protocol", "")} |' for m in metrics) or '| - | - | not measured yet | - |'
    values = dict(
        model=result['model'], architecture=result['architecture'], repo_id=result['repo_id'],
        description=entry.get('description') or cfg.get('description') or '',
        license=data.license + (f' ({entry["license_name"]})' if entry.get('license_name') else ''),
        data_terms=entry.get('data_terms') or 'See the training data\'s own terms.',
        training_data=entry.get('training_data') or 'Not recorded.',
        source=result['source'] or 'Not recorded.',
        dropped=', '.join(f'`{k}`' for k in _collapse(result['dropped'])) or 'none',
        sha256=result['sha256'], size=result['size'], num_classes=model.num_classes,
        labels=', '.join(cfg.get('label_names') or EXPRESSIONS),
        aus=', '.join(f'{a} ({FACS_NAMES[a]})' for a in au_names) or 'none (no AU branch)',
        input_size='x'.join(map(str, cfg['input_size'][1:])), mean=tuple(cfg['mean']), std=tuple(cfg['std']),
        metrics=metric_lines, paper=PAPER_ID,
    )
    body = string.Template(template.read_text(encoding='utf-8')).substitute(values)
    return f'---\n{data.to_yaml()}\n---\n{body}'


def _metric_value(metric: Dict[str, Any]) -> str:
    if metric.get('value') is None:
        return 'not measured yet'
    if metric.get('reported_by'):
        return f'not measured on this file ({metric["reported_by"]} reports {metric["value"]})'
    return str(metric['value'])


def push_release(out_dir: os.PathLike, repo_id: str, revision: Optional[str] = None,
                 commit_message: str = 'Add weights converted by aucvt_zoo') -> str:
    """Upload a release folder to the Hub as it is (no re-serialisation, so its sha256 stays valid); the commit id.

    The token comes from the environment (HF_TOKEN) or the huggingface-cli login, never from the command line.
    """
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), revision=revision,
                             commit_message=commit_message)
    return info.oid


# --- files ---------------------------------------------------------------------------------------------------------
def save_safetensors(tensors: Dict[str, torch.Tensor], path: os.PathLike, metadata: Dict[str, str]) -> None:
    """`safetensors.torch.save_file` with the JSON header's keys sorted, so equal tensors give equal bytes.

    safetensors writes its metadata map in a per-process random order, which would make the sha256 of a release
    differ between two conversions of the same weights.
    """
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    with open(path, 'r+b') as f:
        size = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(',', ':')).encode()
        if len(canonical) > size:  # cannot happen: sorting and compact separators never lengthen the header
            raise ConversionError(f'canonical safetensors header of {path} is longer than the written one')
        f.seek(8)
        f.write(canonical + b' ' * (size - len(canonical)))  # the format pads headers with spaces


# --- the README table ---------------------------------------------------------------------------------------------
def weights_table(manifest: Optional[Dict[str, Any]] = None) -> str:
    """The README "Weights" table: one row per manifest entry, saying plainly whether it is published."""
    manifest = manifest if manifest is not None else load_manifest()
    rows = ['| model | Hub repo | status | source | licence | metric (protocol) | sha256 |',
            '|---|---|---|---|---|---|---|']
    for e in manifest['entries']:
        measured = [m for m in e.get('metrics') or [] if m.get('value') is not None and not m.get('reported_by')]
        reported = [m for m in e.get('metrics') or [] if m.get('value') is not None and m.get('reported_by')]
        if measured:
            metric = '; '.join(f'{m.get("name", m["type"])} {m["value"]} ({m.get("protocol", "")})' for m in measured)
        elif reported:
            metric = 'not measured; ' + '; '.join(
                f'{m["reported_by"]}: {m.get("name", m["type"])} {m["value"]:.4f}' for m in reported)
        else:
            metric = 'not measured'
        status = {'published': 'published',
                  'shipped': f'shipped in the package (`{e.get("package_file")}`); Hub: planned'}.get(
            e.get('status'), 'not published yet (planned)')
        licence = e.get('license', '') + (f': {e["license_name"]}' if e.get('license_name') else '')
        rows.append(f'| `{e["model"]}` | `{e["repo_id"]}` | {status} | {e.get("source_short", "")} | {licence} | '
                    f'{metric} | {(e.get("sha256") or "-")[:12]} |')
    return '\n'.join(rows)


# --- helpers ------------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _preview(keys, n: int = 8) -> str:
    keys = list(keys)
    shown = ', '.join(str(k) for k in keys[:n])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def _ranges(indices: Sequence[int]) -> str:
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(f'{start}' if start == v else f'{start}-{v}')
            start = None
    return ', '.join(out) or 'none'


def _collapse(keys: Sequence[str]) -> List[str]:
    """Module prefixes of dropped keys ('vit.output_layer.2.weight' -> 'vit.output_layer.*'), for messages."""
    out: List[str] = []
    for key in keys:
        prefix = next((p for p in AUTHORS_UNUSED + ('output_layer.', 'body.') if key.startswith(p)), None)
        item = (prefix + '*') if prefix else key
        if prefix == 'body.':
            item = 'body.' + key.split('.')[1] + '.*'
        if item not in out:
            out.append(item)
    return out


def _layout_guess(keys: Sequence[str]) -> str:
    """A short description of an unknown state dict: the InsightFace/AdaFace markers or the top-level modules."""
    tops = sorted({k.split('.')[0] for k in keys})
    if 'bn1.weight' in keys or any(k.startswith(('layer1.', 'features.')) for k in keys):
        return (f'an InsightFace-style ResNet (modules {", ".join(tops[:10])}: conv1/bn1/prelu, layer1-4, '
                f'features/fc)')
    if any(re.match(r'body\.\d+\.res_layer\.5\.', k) for k in keys):
        return 'an AdaFace-style IR (res_layer with 6 modules: BN, conv, BN, PReLU, conv, BN)'
    return f'top-level modules {", ".join(tops[:12])}'


# --- command line -------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m aucvt_zoo.convert', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument('source', help='the checkpoint file (or, for "checkpoint", a Hub-format folder)')
        q.add_argument('--out', required=True, help='folder to write the release to')
        q.add_argument('--entry', help='weights-manifest entry (e.g. aucvt_raf.lsd) whose licence, data terms and '
                                       'metrics go into the model card')
        q.add_argument('--manifest', help='weights manifest (default: weights/manifest.json)')
        q.add_argument('--card-template', help='model-card template (default: weights/model_card.md)')
        q.add_argument('--trust-pickle', action='store_true',
                       help='unpickle arbitrary objects in a .pth (runs code from the file: trusted files only)')
        q.add_argument('--push', metavar='REPO', help='upload the folder to this Hub repo (token from HF_TOKEN)')
        q.add_argument('--revision', help='branch to push to (default: main)')

    q = sub.add_parser('evolve', help='face.evoLVe IR-50 .pth -> ir50 release or CVT embedding')
    common(q)
    q.add_argument('--target', default='ir50', help="'ir50' (default), 'ir50_tiny', or 'embedding' (units 0-20)")
    q = sub.add_parser('authors', help="the authors' AU-CVT training checkpoint -> *_released release")
    common(q)
    q = sub.add_parser('checkpoint', help="the zoo trainer's output -> release")
    common(q)
    q.add_argument('--model', help='architecture, if the checkpoint does not record it')
    q.add_argument('--model-args', type=json.loads, default=None, help='JSON dict of model arguments')
    q = sub.add_parser('table', help='print the README "Weights" table from the manifest')
    q.add_argument('--manifest', help='weights manifest (default: weights/manifest.json)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        manifest = load_manifest(Path(args.manifest) if args.manifest else None)
        if args.command == 'table':
            print(weights_table(manifest))
            return 0
        entry = None
        if args.entry:
            entry = next((e for e in manifest['entries'] if e['model'] == args.entry), None)
            if entry is None:
                raise ConversionError(f'No entry {args.entry!r} in {args.manifest or str(manifest_path())!r}; known: '
                                      f'{", ".join(e["model"] for e in manifest["entries"])}.')
        source = Path(args.source)
        if args.command == 'checkpoint':
            state_dict, report = convert_zoo_checkpoint(source, args.model, args.model_args, args.trust_pickle)
        else:
            state_dict = unwrap_state_dict(load_checkpoint(source, trust_pickle=args.trust_pickle))
            if args.command == 'evolve':
                state_dict, report = convert_evolve(state_dict, args.target)
            else:
                state_dict, report = convert_authors(state_dict)
        if args.command == 'evolve' and args.target == 'embedding':
            return _write_embedding(state_dict, report, Path(args.out), source)
        model = build_converted(state_dict, report)
        result = save_release(model, args.out, entry=entry, source=f'{source.name} ({report["source_layout"]})',
                              dropped=report['dropped'], card_template=args.card_template)
    except ConversionError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {args.out}: {report["architecture"]} ({sum(p.numel() for p in model.parameters()):,} parameters)')
    if report['dropped']:
        print(f'dropped {len(report["dropped"])} source keys never used by the model: '
              f'{", ".join(_collapse(report["dropped"]))}')
    print(f'sha256 {result["sha256"]}  {WEIGHTS_FILE}')
    if args.push:
        commit = push_release(args.out, args.push, revision=args.revision)
        result.update(repo_id=args.push, revision=commit)
        print(f'pushed to {args.push} at commit {commit}')
    print('manifest entry:')
    print(json.dumps({k: result[k] for k in ('model', 'repo_id', 'revision', 'file', 'sha256', 'size')}, indent=2))
    return 0


def _write_embedding(state_dict: Dict[str, torch.Tensor], report: Dict[str, Any], out: Path, source: Path) -> int:
    from .models.ir50 import IResNet
    layers = report['model_args']['trunk_layers']
    channels = tuple(int(state_dict[f'stages.{s}.0.residual.1.weight'].shape[0]) for s in range(len(layers)))
    trunk = IResNet(layers, channels, num_classes=0, global_pool='')
    trunk.load_state_dict(state_dict, strict=True)  # the embedding is exactly units 0-20, nothing else
    out.mkdir(parents=True, exist_ok=True)
    path = out / 'ir50_embedding.safetensors'
    save_safetensors(trunk.state_dict(), path, metadata={'format': 'pt', META_ARCHITECTURE: 'ir50_embedding'})
    print(f'wrote {path}: IR-50 units 0-20 ({sum(p.numel() for p in trunk.parameters()):,} parameters), load with '
          f'model.load_trunk_state_dict(safetensors.torch.load_file(...))')
    print(f'dropped: {", ".join(_collapse(report["dropped"]))}')
    print(f'sha256 {sha256_file(path)}  {path.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
