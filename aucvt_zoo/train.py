"""Train or fine-tune any zoo or timm model on facial expressions, jointly with AU labels when there are any.

    python -m aucvt_zoo.train --preset aucvt-openface --data lsd_openface.csv --val-data LSD/validation
    python -m aucvt_zoo.train --preset aucvt-rafau --data LSD/train --aux-data RAF-AU --val-data LSD/validation
    torchrun --nproc_per_node 4 -m aucvt_zoo.train --preset cvt --data LSD/train --val-data LSD/validation

One loop for every row of the paper's Table 1 (arXiv:2207.09777): the loss is alpha * CE over samples with an
expression label + beta * BCE over labelled AU entries (`aucvt_zoo.losses.JointLoss`). AU labels come either with
the training images (LSD + OpenFace pseudo-labels, a label CSV with AU columns) or from a second loader over an
auxiliary AU dataset (`--aux-data`, e.g. RAF-AU) whose batch is concatenated to the main one at every step.
Models without an AU branch (timm's resnet50 / ViT, cvt_ir50) see the same loop with CE only.

Defaults are the recipe of the paper's section 4.2; `--preset` picks a Table 1 row's model and initialisation.
`--batch-size` is the global batch of one optimizer step (the paper's 512 over 4 GPUs): it is split over the
processes of a torchrun and the `--grad-accum-steps` micro-batches of each, and the loss is normalised so that
every split computes the gradient of the same full batch.

Reproducibility: the order of the training samples is a function of (seed, epoch) and every augmentation draws
from a generator seeded by (seed, epoch, sample index), so `--resume` continues bit-for-bit, with any number of
loader workers, and a torchrun sees the same global batches as one process.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import save_for_hf
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T

from .convert import load_checkpoint, unwrap_state_dict
from .data.readers import LabelCsv, LsdFolder, RafAu
from .hub import PretrainedWeightsError
from .labels import EXPRESSIONS
from .losses import JointLoss, label_counts
from .metrics import au_metrics, expression_metrics

__all__ = [
    'PRESETS', 'DATA_SOURCES', 'DEFAULT_DATA', 'register_data', 'open_dataset', 'build_parser', 'parse_args',
    'create_model', 'data_config', 'train_transform', 'eval_transform', 'evaluate', 'save_hub_checkpoint', 'main',
]

# The recipe of the paper's section 4.2; the augmentation strengths and the auxiliary batch are our choice
# (the paper names the augmentations only).
RECIPE: Dict[str, Any] = dict(
    epochs=10, warmup_epochs=3, lr=1e-4, min_lr=0., batch_size=512, momentum=0.9, weight_decay=5e-4,
    alpha=1., beta=1., hflip=0.5, grayscale=0.2, blur=0.5, aux_batch_size=128,
)

# Table 1's rows: the model and its initialisation. 'hub' = the MS-Celeb-1M IR-50 release (`ir50`, pretrained).
PRESETS: Dict[str, Dict[str, Any]] = {
    # section 4.2 resizes every face to 112 ("short edge of 112"), the ImageNet models included
    'resnet50-imagenet': dict(model='resnet50', pretrained=True, ir50_checkpoint=None, img_size=112),
    'vit-imagenet': dict(model='vit_base_patch16_224', pretrained=True, ir50_checkpoint=None, img_size=112),
    'cvt': dict(model='cvt_ir50', pretrained=False, ir50_checkpoint='hub'),
    'aucvt-rafau': dict(model='aucvt_raf', pretrained=False, ir50_checkpoint='hub', require_aux_data=True),
    'aucvt-openface': dict(model='aucvt_openface', pretrained=False, ir50_checkpoint='hub'),
}

# Named data sources (`--data NAME`): NAME -> fn(split, transform, au_names) -> Dataset, split 'train' or 'val'.
DATA_SOURCES: Dict[str, Callable[[str, Callable, Sequence[str]], Dataset]] = {}
# A line said before training on a named source, so nobody mistakes what the model learnt from.
DATA_NOTES: Dict[str, str] = {}

# What `--data` is when not given: the built-in faces, so `python -m aucvt_zoo.train` runs anywhere.
DEFAULT_DATA: Optional[str] = 'builtin'

# The newcomer's run on the built-in faces: a tiny AU-CVT trained from scratch, so the recipe is not the paper's
# fine-tuning one (lr 1e-4 moves a random network too little in a hundred steps; 0.05 diverged, 0.01 with the
# gradient norm clipped at 2 learns steadily) and fits a CPU in minutes.
DEMO = dict(
    model='aucvt_openface_tiny', batch_size=64, lr=0.01, clip_grad=2.0, epochs=2, warmup_epochs=0.25, workers=1)
PRESETS_DEMO: Dict[str, Dict[str, Any]] = {
    'demo': dict(DEMO, data='builtin'),
    # the same budget for each of three models on the same faces: a small Table 1 (CNN, CVT, AU-CVT)
    'demo-table1': dict(DEMO, data='builtin'),
}
DEMO_TABLE1_MODELS = (
    ('CNN (IR trunk only)', 'ir50_tiny'),
    ('CVT', 'cvt_ir50_tiny'),
    ('AU-CVT (AUs of the rendered faces)', 'aucvt_openface_tiny'),
)
# Built-in faces per split: "synthetic" style for training, "real" style (other identities, texture, light, blur,
# noise, JPEG) for validation, the paper's synthetic-to-real question in miniature.
BUILTIN_SIZES = dict(train=3000, val=600)


def _builtin_faces(split: str, transform: Callable, au_names: Sequence[str]) -> Dataset:
    from .data.faces import FacsFaces
    style, seed = ('synthetic', 0) if split == 'train' else ('real', 1)
    return FacsFaces(BUILTIN_SIZES[split], style=style, au_names=tuple(au_names), seed=seed, transform=transform)


def register_data(name: str, fn: Callable[[str, Callable, Sequence[str]], Dataset], note: str = '') -> None:
    """Make `--data NAME` (and `--val-data NAME`) open `fn(split, transform, au_names)`.

    `note` is printed before training on that source (what the data is, so no one mistakes it).
    """
    DATA_SOURCES[name] = fn
    if note:
        DATA_NOTES[name] = note


register_data('builtin', _builtin_faces, note=(
    'Data: the built-in procedural FACS faces (aucvt_zoo.data.faces), {train} "synthetic"-style faces for training '
    'and {val} "real"-style faces for validation. They are rendered cartoons, NOT LSD or any real face data: the '
    'numbers below say how the method behaves on them, not how it does on real expressions.').format(**BUILTIN_SIZES))


# ---------------------------------------------------------------------------------------------------- config

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m aucvt_zoo.train', description=__doc__.split('\n\n')[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS) + sorted(PRESETS_DEMO),
                   help="a Table 1 row's model and initialisation; 'demo' (the default on the built-in faces) and "
                        "'demo-table1' (CNN, CVT and AU-CVT on the built-in faces, as a small Table 1)")
    g = p.add_argument_group('data')
    g.add_argument('--data', default=DEFAULT_DATA,
                   help='training data: a folder per expression, a label CSV, a RAF-AU folder, or a registered name '
                        f'({", ".join(DATA_SOURCES) or "none registered"})')
    g.add_argument('--val-data',
                   help='validation data (same kinds); a registered --data name defaults to its val split')
    g.add_argument('--aux-data', help='auxiliary AU data (RAF-AU folder or label CSV), cycled alongside --data')
    g.add_argument('--aux-batch-size', type=int, help='global batch of --aux-data per optimizer step')
    g.add_argument('--workers', type=int, default=4, help='data loader processes per training process')
    g.add_argument('--on-error', choices=('raise', 'skip'), default='raise',
                   help='an unreadable image stops the run, or is skipped with a warning naming it')
    g.add_argument('--hflip', type=float, help='probability of a horizontal flip')
    g.add_argument('--grayscale', type=float, help='probability of converting to grayscale')
    g.add_argument('--blur', type=float, help='probability of a Gaussian blur (kernel 5, sigma 0.1-2)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='aucvt_openface', help='any zoo or timm model name, or hf-hub:<repo>')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help="start from the model's pretrained weights")
    g.add_argument('--ir50-checkpoint',
                   help="IR-50 weights for a CVT model's CNN trunk: a .pth/.safetensors file (face.evoLVe or ir50 "
                        "names), 'hub' for the released MS-Celeb-1M ir50, 'none' to start from scratch")
    g.add_argument('--img-size', type=int,
                   help="square input size (default: the model's pretrained_cfg); models with a fixed input size "
                        "(ViT, CVT) are built for it")
    g.add_argument('--drop-rate', type=float, default=0., help='dropout before the classifier')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=float, help='length of the schedule in epochs of --data')
    g.add_argument('--warmup-epochs', type=float, help='linear warm-up, then cosine decay for the rest')
    g.add_argument('--max-steps', type=int, help='stop after this many optimizer steps (the schedule is unchanged)')
    g.add_argument('--lr', type=float, help='peak learning rate')
    g.add_argument('--min-lr', type=float, help='learning rate at the end of the cosine decay')
    g.add_argument('--batch-size', type=int, help='global batch of --data per optimizer step')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer step and process')
    g.add_argument('--momentum', type=float, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, help='weight decay (never on norms, biases, position embeddings)')
    g.add_argument('--clip-grad', type=float, help='clip the gradient norm to this value')
    g.add_argument('--alpha', type=float, help='weight of the expression loss')
    g.add_argument('--beta', type=float, help='weight of the AU loss')
    g = p.add_argument_group('run')
    g.add_argument('--output', help='output folder (default runs/<model>-<date-time>, or the --resume run\'s folder)')
    g.add_argument('--resume', help='a checkpoint.pt (or the run folder holding one) to continue from')
    g.add_argument('--seed', type=int, default=0, help='seed of initialisation, sample order and augmentation')
    g.add_argument('--device', default='auto', help="'cpu', 'cuda', 'cuda:1', ... ('auto': cuda when available)")
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic kernels only (bit-exact resume on CUDA too; slower)')
    g.add_argument('--amp', action='store_true', help='mixed precision autocast (bf16 on CPU or CUDA, fp16 on CUDA)')
    g.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default='bfloat16', help='autocast dtype')
    g.add_argument('--eval-every', type=int, default=0,
                   help='evaluate every N steps (0: once per epoch) and at the end')
    g.add_argument('--checkpoint-every', type=int, default=0,
                   help='write checkpoint.pt every N steps (0: at each eval)')
    g.add_argument('--eval-batch-size', type=int, default=256, help='global batch of the evaluation')
    g.add_argument('--log-every', type=int, default=10, help='steps between log lines when stdout is not a terminal')
    p.set_defaults(**RECIPE)
    p.epilog = 'presets (Table 1 rows; explicit flags still win): ' + '; '.join(
        f'{name}: ' + ', '.join(f'{k}={v}' for k, v in values.items() if k != 'require_aux_data')
        for name, values in PRESETS.items())
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; the recipe, then the preset, then explicit flags decide each value."""
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    preset = known.preset or ('demo' if known.data in (None, 'builtin') else None)
    values = PRESETS.get(preset) or PRESETS_DEMO.get(preset, {})
    parser.set_defaults(**{k: v for k, v in values.items() if k != 'require_aux_data'})
    args = parser.parse_args(argv)
    args.preset = preset
    if args.data is None:
        parser.error(
            '--data is required: a folder with one sub-folder per expression (LSD layout), a label CSV (image, '
            f'expression, AU1, AU2, ... columns) or a RAF-AU folder{_registered_names_hint()}.')
    if values.get('require_aux_data') and not args.aux_data:
        parser.error(f'--preset {preset} trains the AU branch on an auxiliary AU dataset: pass --aux-data <RAF-AU '
                     f'folder or label CSV>, or use --preset aucvt-openface for AU labels that come with --data.')
    for name in ('batch_size', 'aux_batch_size', 'grad_accum_steps', 'eval_batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, not {getattr(args, name)}.')
    if not 0 <= args.warmup_epochs < args.epochs:
        parser.error(f'--warmup-epochs {args.warmup_epochs} must lie in [0, --epochs {args.epochs}): the cosine decay '
                     f'takes the epochs after the warm-up.')
    return args


def _registered_names_hint() -> str:
    return f', or a registered name ({", ".join(DATA_SOURCES)})' if DATA_SOURCES else ''


# ---------------------------------------------------------------------------------------------------- data

def train_transform(data_cfg: Dict[str, Any], hflip: float, grayscale: float, blur: float) -> Callable:
    """The paper's augmentations (flip, grayscale, Gaussian blur) at the model's input size and normalisation."""
    return T.Compose([
        T.Resize(data_cfg['input_size'][1:]),
        T.RandomHorizontalFlip(hflip),
        T.RandomGrayscale(grayscale),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=blur),
        T.ToTensor(),
        T.Normalize(data_cfg['mean'], data_cfg['std']),
    ])


def eval_transform(data_cfg: Dict[str, Any]) -> Callable:
    """Resize to the model's input size and normalise with its `pretrained_cfg` values."""
    return T.Compose([
        T.Resize(data_cfg['input_size'][1:]),
        T.ToTensor(),
        T.Normalize(data_cfg['mean'], data_cfg['std']),
    ])


def open_dataset(
        spec: str,
        split: str,
        transform: Callable,
        au_names: Sequence[str],
        on_error: str = 'raise',
) -> Dataset:
    """The dataset a `--data` value names: a registered source, a RAF-AU folder, a label CSV, or class folders."""
    if spec in DATA_SOURCES:
        return DATA_SOURCES[spec](split, transform, au_names)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f'Data {spec!r} ({split}) is neither a file nor a folder{_registered_names_hint()}. Pass a folder with '
            f'one sub-folder per expression, a label CSV or a RAF-AU folder.')
    if path.name == 'RAFAU_label.txt':
        path = path.parent
    if path.is_dir() and (path / 'RAFAU_label.txt').is_file():
        return RafAu(str(path), au_names=au_names, transform=transform, on_error=on_error)
    if path.is_file():
        return LabelCsv(str(path), au_names=au_names, transform=transform, on_error=on_error)
    return LsdFolder(str(path), au_names=au_names, transform=transform, on_error=on_error)


class SeededItems(Dataset):
    """A dataset whose item `i` in epoch `e` is transformed under an RNG seeded by (seed, e, i).

    Augmentation then depends on neither the loader worker nor the position in a run, which is what makes a
    resumed or distributed run see exactly the images of an uninterrupted one-process run.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2 ** 63))
            return self.dataset[index]


class ResumableSampler(Sampler):
    """`DistributedSampler` (shuffled by seed + epoch, no padding) that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        self.sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.start:])


class ShardSampler(Sampler):
    """Every `num_replicas`-th index from `rank`, in order and without padding (evaluation: no sample twice)."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class _Indexed(Dataset):
    """Items of a dataset with their index appended (evaluation gathers predictions by index across ranks)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


def _au_targets(aus: torch.Tensor, num_aus: int, source: str) -> torch.Tensor:
    """AU targets shaped for the model: a dataset without AU labels may give (B, 0); make those all-NaN."""
    if aus.shape[-1] == num_aus:
        return aus.float()
    if aus.numel() == 0 or torch.isnan(aus).all():
        return aus.new_full((aus.shape[0], num_aus), float('nan'), dtype=torch.float32)
    raise ValueError(
        f'{source} gives {aus.shape[-1]} AU labels per image but the model predicts {num_aus} AUs; read the labels '
        f"in the model's AU order (model.au_names), or use a model whose AU set matches the data.")


# ---------------------------------------------------------------------------------------------------- model

class BothHeads(nn.Module):
    """Expression and AU logits from one forward pass of any model, so DDP wraps one module that returns both.

    Zoo CVT models answer `forward_with_aus`; any other model gives its logits and (B, 0) AU logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.model, 'forward_with_aus'):
            return self.model.forward_with_aus(x)
        logits = self.model(x)
        return logits, logits.new_zeros((logits.shape[0], 0))


def model_au_names(model: nn.Module) -> Tuple[str, ...]:
    return tuple(getattr(model, 'au_names', ()))


def data_config(model: nn.Module, img_size: Optional[int] = None) -> Dict[str, Any]:
    """Input size and normalisation from the model's `pretrained_cfg`, at `img_size` when given."""
    cfg = resolve_data_config(model=model)
    if img_size:
        cfg['input_size'] = (cfg['input_size'][0], img_size, img_size)
    return cfg


def create_model(
        name: str,
        pretrained: bool = False,
        ir50_checkpoint: Optional[str] = None,
        img_size: Optional[int] = None,
        **kwargs,
) -> nn.Module:
    """A zoo or timm model with the 6-expression head, its CNN trunk optionally initialised from IR-50 weights.

    `img_size` rebuilds a model whose input size is fixed (ViT position embeddings, CVT heads) for that size; other
    models take any size and only the data transform changes (see `data_config`).
    """
    model = timm.create_model(name, pretrained=pretrained, num_classes=len(EXPRESSIONS), **kwargs)
    if img_size and model.pretrained_cfg.get('fixed_input_size') and \
            tuple(model.pretrained_cfg['input_size'][1:]) != (img_size, img_size):
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=len(EXPRESSIONS), img_size=img_size, **kwargs)
    if ir50_checkpoint and ir50_checkpoint.lower() != 'none':
        if not hasattr(model, 'load_trunk_state_dict'):
            raise ValueError(
                f'--ir50-checkpoint initialises the IR-50 trunk of a CVT model; {name!r} has none. Drop the flag '
                f'(or pass --ir50-checkpoint none) for this model.')
        if ir50_checkpoint == 'hub':
            try:
                state = timm.create_model('ir50', pretrained=True).state_dict()
            except PretrainedWeightsError as err:
                raise PretrainedWeightsError(
                    f'{err} For training, --ir50-checkpoint PATH takes a local face.evoLVe IR-50 file instead, and '
                    f'--ir50-checkpoint none starts the trunk from scratch.') from err
        else:
            state = unwrap_state_dict(load_checkpoint(ir50_checkpoint))
        model.load_trunk_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------------- processes

class Processes:
    """This process's place in a torchrun (RANK / WORLD_SIZE / LOCAL_RANK), or a single process."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.distributed = self.world_size > 1
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        if self.distributed and self.device.type == 'cuda':
            self.device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.distributed and not dist.is_initialized():
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> List[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(
        net: nn.Module,
        dataset: Dataset,
        procs: Processes,
        au_names: Sequence[str],
        batch_size: int = 256,
        workers: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Expression (and AU) metrics of `net` (a `BothHeads`) on `dataset`, over the predictions of every process."""
    was_training = net.training
    net.eval()
    loader = DataLoader(
        _Indexed(dataset), batch_size=max(1, batch_size // procs.world_size),
        sampler=ShardSampler(len(dataset), procs.world_size, procs.rank), num_workers=workers,
        generator=torch.Generator().manual_seed(0))
    indices, expr_logits, au_logits, expressions, aus = [], [], [], [], []
    for x, expr, au, index in loader:
        x = x.to(procs.device, non_blocking=True)
        with torch.autocast(procs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            e, a = net(x)
        indices.append(index)
        expr_logits.append(e.float().cpu())
        au_logits.append(a.float().cpu())
        expressions.append(expr)
        aus.append(_au_targets(au, len(au_names), 'the validation data'))
    net.train(was_training)
    local = [torch.cat(t) if t else torch.zeros(0) for t in (indices, expr_logits, au_logits, expressions, aus)]
    parts = procs.gather(local)
    index = torch.cat([p[0] for p in parts])
    order = index.argsort()
    expr_logits, au_logits, expressions, aus = (torch.cat([p[i] for p in parts])[order] for i in range(1, 5))

    labelled = expressions >= 0
    if not labelled.any():
        raise ValueError('The validation data has no expression labels to score; pass --val-data with expressions.')
    # f1 (macro over the 6 expressions), accuracy, per_class_f1, confusion (rows = true class)
    metrics: Dict[str, Any] = expression_metrics(expressions[labelled].numpy(), expr_logits[labelled].numpy())
    metrics['num_images'] = int(index.numel())
    if au_names and (~torch.isnan(aus)).any():
        au = au_metrics(aus.numpy(), torch.sigmoid(au_logits).numpy(), au_names=au_names)
        # an AU without a labelled image has no F1: None, so metrics.jsonl stays strict JSON (no NaN)
        per_au = {k: None if math.isnan(v) else v for k, v in au['per_au_f1'].items()}
        metrics.update(mean_au_f1=au['mean_f1'], per_au_f1=per_au, au_labelled=au['labelled'])
    return metrics


# ---------------------------------------------------------------------------------------------------- schedule

def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps` (per step)."""
    if step < warmup_steps:
        # (step + 1): the first step already moves, the last warm-up step reaches the peak
        return lr * (step + 1) / warmup_steps
    progress = min(1., (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1. + math.cos(math.pi * progress))


def _batches(
        loader: DataLoader,
        sampler: ResumableSampler,
        dataset: SeededItems,
        steps_per_epoch: int,
        accum: int,
        start_step: int,
) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The micro-batches of every step from `start_step` on, epoch after epoch, skipping none and loading none twice.

    Step s reads micro-batches s * accum ... of its epoch; an epoch's remainder that fills no whole step is left out.
    """
    step = start_step
    while True:
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start=first * accum * loader.batch_size)
        dataset.epoch = epoch
        batches = iter(loader)
        for _ in range(first, steps_per_epoch):
            yield [next(batches) for _ in range(accum)]
        del batches  # stops the workers before the next epoch's start
        step = (epoch + 1) * steps_per_epoch


# ---------------------------------------------------------------------------------------------------- outputs

def save_hub_checkpoint(model: nn.Module, directory: Path) -> None:
    """config.json + model.safetensors in timm's Hub format (`pretrained_cfg_overlay=dict(file=...)` loads it)."""
    model_config: Dict[str, Any] = dict(label_names=list(EXPRESSIONS))
    if model_au_names(model):
        model_config['au_names'] = list(model_au_names(model))
    save_for_hf(model, directory, safe_serialization=True, model_config=model_config)


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                   cached=cached),
        python=random.getstate(),
    )


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    random.setstate(state['python'])


def _atomic_save(obj: Any, path: Path) -> None:
    # a run killed while writing must leave the previous checkpoint readable
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume_path(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / 'checkpoint.pt'
    if not path.is_file():
        raise FileNotFoundError(f'--resume {resume}: no checkpoint there (expected a checkpoint.pt or its run folder).')
    return path


class Progress:
    """A one-line progress bar on a terminal; plain log lines every `log_every` steps otherwise."""

    def __init__(self, total: int, enabled: bool, log_every: int, stream=None):
        self.total = total
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def step(self, step: int, epoch: float, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        text = ' '.join(f'{k} {v:.4g}' for k, v in values.items())
        if self.tty:
            done = int(30 * step / self.total)
            self.stream.write(f'\r[{"#" * done}{"." * (30 - done)}] {step}/{self.total} ep {epoch:.2f} {text}\033[K')
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            self.write(f'step {step}/{self.total} epoch {epoch:.2f} {text}')

    def write(self, line: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write('\r\033[K')
            print(line, file=self.stream, flush=True)


def _summary(metrics: Dict[str, Any]) -> str:
    keys = [k for k in ('f1', 'accuracy', 'mean_au_f1') if k in metrics]
    return ' '.join(f'{k} {metrics[k]:.4f}' for k in keys)


# ---------------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train as the command line says; returns the results (final and best-on-validation metrics)."""
    args = parse_args(argv)
    procs = Processes(args.device)
    try:
        if args.preset == 'demo-table1':
            return demo_table1(args, procs)
        return train(args, procs)
    finally:
        procs.close()


def demo_table1(args: argparse.Namespace, procs: Processes) -> Dict[str, Any]:
    """Train a CNN, a CVT and an AU-CVT on the same data and budget; print and save a small Table 1."""
    output = Path(args.output or Path('runs', f'demo-table1-{time.strftime("%Y%m%d-%H%M%S")}'))
    rows = []
    for label, model in DEMO_TABLE1_MODELS:
        run = argparse.Namespace(**dict(vars(args), model=model, output=str(output / model)))
        start = time.perf_counter()
        results = train(run, procs)
        final = results['final']['metrics']
        rows.append(dict(method=label, model=model, f1=final['f1'], accuracy=final['accuracy'],
                         best_f1=results['best']['metrics']['f1'], best_step=results['best']['step'],
                         seconds=time.perf_counter() - start))
    lines = ['| method | model | F1 (final) | accuracy (final) | F1 (best, step) | seconds |',
             '|---|---|---|---|---|---|']
    lines += [f'| {r["method"]} | `{r["model"]}` | {r["f1"]:.4f} | {r["accuracy"]:.4f} | {r["best_f1"]:.4f} '
              f'({r["best_step"]}) | {r["seconds"]:.0f} |' for r in rows]
    note = DATA_NOTES.get(args.data, f'Data: {args.data} (validation: {args.val_data or "its val split"}).')
    table = '\n'.join(lines) + f'\n\nseed {args.seed}. {note}\n'
    if procs.main:
        print('\n' + table)
        (output / 'table1.md').write_text(table)
        (output / 'table1.json').write_text(json.dumps(rows, indent=2))
    return dict(rows=rows, table=table)


def train(args: argparse.Namespace, procs: Processes) -> Dict[str, Any]:
    """The training run of parsed `args` in this process of `procs`."""
    W, accum = procs.world_size, args.grad_accum_steps
    splits = [('--batch-size', args.batch_size)] + [('--aux-batch-size', args.aux_batch_size)] * bool(args.aux_data)
    for flag, size in splits:
        if size % (W * accum):
            raise ValueError(
                f'{flag} {size} is the batch of one optimizer step; it must split evenly over {W} process(es) x '
                f'{accum} accumulation step(s). Choose a multiple of {W * accum}.')
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    if amp_dtype == torch.float16 and procs.device.type != 'cuda':
        raise ValueError('--amp-dtype float16 needs a CUDA device; on CPU use --amp-dtype bfloat16.')
    checkpoint = None
    if args.resume:
        resume_path = _resume_path(args.resume)
        checkpoint = torch.load(resume_path, map_location='cpu', weights_only=True)
        if checkpoint['config']['model'] != args.model:
            raise ValueError(f'--resume {args.resume} holds a {checkpoint["config"]["model"]!r} run, not --model '
                             f'{args.model!r}; pass the same flags as the run you continue.')
    # a resumed run continues in its own folder unless told otherwise
    default_output = resume_path.parent if checkpoint else Path(
        'runs', f'{args.model.replace("/", "_")}-{time.strftime("%Y%m%d-%H%M%S")}')
    output = Path(args.output) if args.output else default_output
    if checkpoint is None and (output / 'checkpoint.pt').exists():
        raise FileExistsError(
            f'{output} already holds a run: pass --resume {output} to continue it, or another --output.')

    if args.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # the same initial weights on every process; afterwards each process draws its own dropout masks
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = create_model(
        args.model, pretrained=args.pretrained and checkpoint is None,
        ir50_checkpoint=None if checkpoint else args.ir50_checkpoint, img_size=args.img_size, drop_rate=args.drop_rate)
    torch.manual_seed(args.seed + procs.rank)
    au_names = model_au_names(model)
    data_cfg = data_config(model, args.img_size)

    augment = train_transform(data_cfg, args.hflip, args.grayscale, args.blur)
    train_set = SeededItems(open_dataset(args.data, 'train', augment, au_names, args.on_error), args.seed)
    val_spec = args.val_data or (args.data if args.data in DATA_SOURCES else None)
    val_set = open_dataset(val_spec, 'val', eval_transform(data_cfg), au_names, args.on_error) if val_spec else None
    aux_set = None
    if args.aux_data:
        if not au_names:
            raise ValueError(f'--aux-data gives AU labels, but {args.model!r} has no AU branch to learn them: use an '
                             f'AU-CVT model (e.g. --model aucvt_raf) or drop --aux-data.')
        # another seed: the auxiliary images must not share the main images' augmentation draws
        aux_set = SeededItems(open_dataset(args.aux_data, 'train', augment, au_names, args.on_error), args.seed + 1)

    def loader_for(dataset: SeededItems, global_batch: int, name: str) -> Tuple[DataLoader, int]:
        micro = global_batch // (W * accum)
        sampler = ResumableSampler(dataset, W, procs.rank, args.seed)
        steps = sampler.sampler.num_samples // micro // accum
        if steps == 0:
            raise ValueError(
                f'{name} has {len(dataset)} images, fewer than one step of {global_batch} needs; lower the batch size.')
        loader = DataLoader(
            dataset, batch_size=micro, sampler=sampler, num_workers=args.workers, drop_last=True,
            pin_memory=procs.device.type == 'cuda', generator=torch.Generator().manual_seed(args.seed))
        return loader, steps

    train_loader, steps_per_epoch = loader_for(train_set, args.batch_size, '--data')
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    eval_every = args.eval_every or steps_per_epoch
    checkpoint_every = args.checkpoint_every or eval_every

    model.to(procs.device)
    groups = param_groups_weight_decay(
        model, args.weight_decay, no_weight_decay_list=getattr(model, 'no_weight_decay', set)())
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype == torch.float16)
    criterion = JointLoss(args.alpha, args.beta)
    net = BothHeads(model)
    train_net = DistributedDataParallel(
        net, device_ids=[procs.device.index] if procs.device.type == 'cuda' else None) if procs.distributed else net

    config = dict(
        vars(args), output=str(output), world_size=W, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        warmup_steps=warmup_steps, last_step=last_step, micro_batch_size=args.batch_size // (W * accum),
        au_names=list(au_names), data_config=data_cfg, train_images=len(train_set),
        val_images=len(val_set) if val_set is not None else 0, aux_images=len(aux_set) if aux_set else 0)
    progress = Progress(last_step, procs.main, args.log_every)
    progress.write(
        'Resolved config:\n' + '\n'.join(f'  {k:<20} {json.dumps(v, default=str)}' for k, v in config.items()))
    if args.data in DATA_NOTES:
        progress.write(DATA_NOTES[args.data])
    if val_set is None:
        progress.write('No --val-data: no evaluation during training and no best checkpoint; final/ is the result.')

    start_step, best = 0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
        start_step, best = checkpoint['step'], checkpoint['best']
        if checkpoint['schedule'] != dict(total_steps=total_steps, warmup_steps=warmup_steps):
            progress.write(f'warning: the schedule differs from the checkpoint\'s ({checkpoint["schedule"]}): the data '
                           f'or the flags changed, so the run will not match an uninterrupted one.')
        rng = checkpoint['rng']
        _set_rng_state(rng[procs.rank] if len(rng) == W else rng[0])
        progress.write(f'Resumed from {args.resume} at step {start_step}.')

    if procs.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'config.json').write_text(json.dumps(config, indent=2, default=str))
        log_path = output / 'metrics.jsonl'
        # evaluations after the checkpoint we resume from belong to the interrupted run's lost future
        kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() and checkpoint else [])
                if json.loads(line)['step'] <= start_step]
        log_path.write_text(''.join(line + '\n' for line in kept))

    batches = _batches(train_loader, train_loader.sampler, train_set, steps_per_epoch, accum, start_step)
    aux_batches = None
    if aux_set is not None:
        aux_loader, aux_steps = loader_for(aux_set, args.aux_batch_size, '--aux-data')
        aux_batches = _batches(aux_loader, aux_loader.sampler, aux_set, aux_steps, accum, start_step)

    def run_eval() -> Dict[str, Any]:
        if procs.distributed:
            # every process must predict with rank 0's BatchNorm statistics, the ones that get saved
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        return evaluate(net, val_set, procs, au_names, args.eval_batch_size, args.workers, amp_dtype)

    def save_checkpoint(step: int) -> None:
        rng = procs.gather(_rng_state())
        if procs.main:
            _atomic_save(dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                epoch=step // steps_per_epoch, schedule=dict(total_steps=total_steps, warmup_steps=warmup_steps),
                rng=rng, best=best, config=vars(args)), output / 'checkpoint.pt')

    train_net.train()
    final_metrics: Optional[Dict[str, Any]] = None
    t0, images = time.perf_counter(), 0
    for step in range(start_step, last_step):
        is_best = False
        lr = lr_at(step, args.lr, args.min_lr, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group['lr'] = lr
        micro_batches = []
        aux_step = next(aux_batches) if aux_batches is not None else None
        for i, (x, expressions, aus) in enumerate(next(batches)):
            aus = _au_targets(aus, len(au_names), '--data')
            if aux_step is not None:
                # regime (b): the auxiliary AU images join the batch, their expression labels are -1
                ax, aexpr, aaus = aux_step[i]
                x = torch.cat([x, ax])
                expressions = torch.cat([expressions, aexpr])
                aus = torch.cat([aus, _au_targets(aaus, len(au_names), '--aux-data')])
            micro_batches.append((x, expressions, aus))
        # normalise by the labels of the whole step on all processes: DDP averages gradients over processes
        counts = procs.all_sum([sum(label_counts(e, a)[k] for _, e, a in micro_batches) for k in (0, 1)])
        expression_norm, au_norm = counts[0] / W, counts[1] / W
        step_loss = torch.zeros(3, device=procs.device)
        for i, (x, expressions, aus) in enumerate(micro_batches):
            x = x.to(procs.device, non_blocking=True)
            expressions, aus = expressions.to(procs.device), aus.to(procs.device)
            sync = i == len(micro_batches) - 1 or not procs.distributed
            with train_net.no_sync() if not sync else contextlib.nullcontext():
                with torch.autocast(procs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    expr_logits, au_logits = train_net(x)
                loss, parts = criterion(expr_logits, au_logits, expressions, aus, expression_norm, au_norm)
                scaler.scale(loss).backward()
            step_loss += torch.stack([loss.detach(), parts['expression'], parts['au']])
            images += x.shape[0] * W
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        step_loss = torch.tensor(procs.all_sum(step_loss.tolist()))
        values = dict(loss=step_loss[0].item(), ce=step_loss[1].item(), bce=step_loss[2].item(), lr=lr,
                      img_s=images / (time.perf_counter() - t0))
        progress.step(done, done / steps_per_epoch, values)

        if val_set is not None and (done % eval_every == 0 or done == last_step):
            metrics = run_eval()
            record = dict(step=done, epoch=done / steps_per_epoch, lr=lr, train_loss=values['loss'], **metrics)
            is_best = best is None or metrics['f1'] > best['metrics']['f1']
            if is_best:
                best = dict(step=done, metrics=metrics)
            if procs.main:
                with open(output / 'metrics.jsonl', 'a') as f:
                    f.write(json.dumps(record) + '\n')
                if is_best:
                    save_hub_checkpoint(model, output / 'best')
            progress.write(f'eval step {done}: {_summary(metrics)}' + (' (best)' if is_best else ''))
            final_metrics = metrics
            t0, images = time.perf_counter(), 0  # evaluation time is not training throughput
        # a new best is checkpointed at once, so best/ on disk never belongs to steps a resumed run repeats
        if done % checkpoint_every == 0 or done == last_step or is_best:
            save_checkpoint(done)

    if final_metrics is None and val_set is not None:
        final_metrics = run_eval()
    results = dict(
        final=dict(step=last_step, metrics=final_metrics),
        best=best, selected_on=val_spec, selection_metric='f1 (macro F1 over the 6 expressions)',
        replica_mismatches=_replica_mismatches(model, procs))
    if procs.main:
        save_hub_checkpoint(model, output / 'final')
        (output / 'results.json').write_text(json.dumps(results, indent=2))
        if final_metrics is not None:
            progress.write(f'final (step {last_step}): {_summary(final_metrics)}; best on {val_spec} (step '
                           f'{best["step"]}, in {output / "best"}): {_summary(best["metrics"])}')
        progress.write(f'Wrote {output}')
    return results


def _replica_mismatches(model: nn.Module, procs: Processes) -> List[str]:
    """Parameters whose bytes differ between processes (none when DDP kept the replicas identical)."""
    digests = {name: hashlib.sha1(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
               for name, p in model.named_parameters()}
    gathered = procs.gather(digests)
    return sorted({name for other in gathered[1:] for name in digests if other[name] != digests[name]})


if __name__ == '__main__':
    main()
