"""Evaluate a checkpoint or a Hub model on labelled faces: expression macro F1, accuracy, per-class F1, confusion
matrix, and per-AU F1 when the data has AU labels.

    python -m aucvt_zoo.evaluate --model aucvt_openface --checkpoint runs/x/best --data LSD/validation
    python -m aucvt_zoo.evaluate --model aucvt_openface --pretrained --data LSD/validation   # the Hub weights
    torchrun --nproc_per_node 4 -m aucvt_zoo.evaluate ...   # predictions gathered from every process

`--checkpoint` takes a folder in timm's Hub format (config.json + model.safetensors, as the trainer writes final/
and best/), a .safetensors or .pth state dict, or the trainer's resumable checkpoint.pt.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .convert import load_checkpoint as read_checkpoint, unwrap_state_dict
from .train import BothHeads, Processes, create_model, data_config, eval_transform, evaluate, model_au_names, \
    open_dataset

__all__ = ['load_checkpoint', 'main']


def load_checkpoint(model: torch.nn.Module, checkpoint: str) -> None:
    """Load weights into `model` from a Hub-format folder, a state-dict file or a trainer checkpoint.pt, strictly."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / 'model.safetensors'
    if not path.is_file():
        raise FileNotFoundError(
            f'--checkpoint {checkpoint}: no such file. Pass a folder with model.safetensors (final/ or best/ of a '
            f'training run), a .safetensors/.pth file, or a checkpoint.pt.')
    # the trainer's resumable checkpoint keeps the weights under 'model'; DataParallel prefixes are dropped
    state = unwrap_state_dict(read_checkpoint(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f'{path} does not fit the model (missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]}); pass '
            f'the --model it was trained as.')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluate as the command line says; returns the metrics (also printed as JSON, and written to --output)."""
    p = argparse.ArgumentParser(
        prog='python -m aucvt_zoo.evaluate', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True, help='zoo or timm model name (or hf-hub:<repo>) the weights belong to')
    p.add_argument('--checkpoint', help='weights: Hub-format folder, .safetensors/.pth file or checkpoint.pt')
    p.add_argument('--pretrained', action='store_true', help="use the model's published weights (no --checkpoint)")
    p.add_argument('--data', required=True, help='labelled data: expression folders, a label CSV or a RAF-AU folder')
    p.add_argument('--img-size', type=int, help="square input size (default: the model's pretrained_cfg)")
    p.add_argument('--batch-size', type=int, default=256, help='global batch')
    p.add_argument('--workers', type=int, default=4, help='data loader processes')
    p.add_argument('--on-error', choices=('raise', 'skip'), default='raise', help='on an unreadable image')
    p.add_argument('--device', default='auto', help="'cpu', 'cuda', ... ('auto': cuda when available)")
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    p.add_argument('--output', help='write the metrics to this JSON file')
    args = p.parse_args(argv)
    if bool(args.checkpoint) == args.pretrained:
        p.error('pass exactly one of --checkpoint PATH (your weights) and --pretrained (the published weights).')

    procs = Processes(args.device)
    try:
        model = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        model.to(procs.device)
        au_names = model_au_names(model)
        dataset = open_dataset(
            args.data, 'val', eval_transform(data_config(model, args.img_size)), au_names, args.on_error)
        metrics = evaluate(BothHeads(model), dataset, procs, au_names, args.batch_size, args.workers,
                           torch.bfloat16 if args.amp else None)
        metrics = dict(model=args.model, checkpoint=args.checkpoint or 'pretrained', data=args.data, **metrics)
        if procs.main:
            text = json.dumps(metrics, indent=2)
            print(text)
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(text + '\n')
        return metrics
    finally:
        procs.close()


if __name__ == '__main__':
    main()
