"""How far apart the built-in faces' two styles are: train on one style, test on both.

    python benchmarks/style_gap.py                          # small CNN, synthetic -> {synthetic, real}, ~2-4 min
    python benchmarks/style_gap.py --train-style real       # the other direction
    python benchmarks/style_gap.py --model aucvt_openface_tiny --steps 200   # a zoo model (slow on CPU)

The renderer is meant to reproduce the paper's setting: a model trained on "synthetic" faces should lose accuracy on
"real" ones (other identities, texture, light, blur, noise, JPEG), as LSD's models do on its real photographs. This
script measures that loss; it is a property of the data, so it is a benchmark, not a test. The default model is a
4-layer CNN defined here so the measurement does not depend on the training module; `style_gap(make_model, ...)`
takes any model factory (a zoo model with `forward_with_aus` also gets the AU loss when `au_weight` > 0).
Results are recorded in docs/faces.md.
"""
import argparse
import json
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from aucvt_zoo.data.faces import STYLES, FacsFaces
from aucvt_zoo.metrics import expression_metrics


class SmallCnn(nn.Module):
    """Four stride-2 conv blocks, global average pool, linear: ~70k parameters, fast on a CPU."""

    def __init__(self, num_classes: int = 6, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
            for i, o in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def render_split(style: str, length: int, seed: int, au_names='openface16'):
    """A split as uint8 images (N, 3, 112, 112), expression labels (N,) and AU targets (N, A)."""
    ds = FacsFaces(length, style=style, au_names=au_names, seed=seed, transform=lambda im: torch.from_numpy(
        np.asarray(im).copy()).permute(2, 0, 1))
    images, labels, aus = zip(*(ds[i] for i in range(length)))
    return torch.stack(images), torch.tensor(labels), torch.stack(aus)


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    return (batch.float() / 255.0 - 0.5) / 0.5  # the zoo's mean = std = 0.5


@torch.no_grad()
def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> Dict[str, float]:
    model.eval()
    logits = torch.cat([model(_normalise(images[i:i + batch])) for i in range(0, len(images), batch)])
    m = expression_metrics(labels, logits)
    return dict(f1=round(m['f1'], 4), accuracy=round(m['accuracy'], 4))


def style_gap(make_model: Callable[[], nn.Module], train_style: str = 'synthetic', train_length: int = 4000,
              val_length: int = 1000, steps: int = 400, batch: int = 64, lr: float = 2e-3, seed: int = 0,
              au_weight: float = 0.0) -> Dict[str, object]:
    """Train `make_model()` on `train_style` faces; macro F1 / accuracy on held-out faces of both styles.

    Train and validation sets use different dataset seeds (so different identities); the validation sets of the
    two styles use the same seed, i.e. the same labels drawn in each style. Returns the metrics per style, the
    gap (same style minus other style) and timings.
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_x, train_y, train_aus = render_split(train_style, train_length, seed=1000 + seed)
    val = {style: render_split(style, val_length, seed=2000 + seed)[:2] for style in STYLES}
    render_s = time.perf_counter() - t0
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.randint(len(train_x), (batch,), generator=generator)
        x = _normalise(train_x[idx])
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip] = x[flip].flip(3)  # horizontal flip: the faces and their AUs are symmetric
        if au_weight > 0 and hasattr(model, 'forward_with_aus'):
            logits, au_logits = model.forward_with_aus(x)
            loss = F.cross_entropy(logits, train_y[idx]) + au_weight * F.binary_cross_entropy_with_logits(
                au_logits, train_aus[idx])
        else:
            loss = F.cross_entropy(model(x), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f'  step {step + 1}/{steps} loss {loss.item():.3f}', flush=True)
    train_s = time.perf_counter() - t0
    results = {style: _evaluate(model, *val[style]) for style in STYLES}
    other = [s for s in STYLES if s != train_style][0]
    return dict(train_style=train_style, results=results,
                gap_f1=round(results[train_style]['f1'] - results[other]['f1'], 4),
                gap_accuracy=round(results[train_style]['accuracy'] - results[other]['accuracy'], 4),
                train_length=train_length, val_length=val_length, steps=steps, batch=batch, seed=seed,
                render_s=round(render_s, 1), train_s=round(train_s, 1))


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Command line: print the style gap as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-style', default='synthetic', choices=STYLES)
    parser.add_argument('--model', default='small_cnn', help="'small_cnn' or a timm / zoo model name")
    parser.add_argument('--train-length', type=int, default=4000)
    parser.add_argument('--val-length', type=int, default=1000)
    parser.add_argument('--steps', type=int, default=400)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--au-weight', type=float, default=0.0, help='AU loss weight (models with forward_with_aus)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == 'small_cnn':
        make_model = SmallCnn
    else:
        import timm
        import aucvt_zoo  # noqa: F401  (registers the zoo's models with timm)
        make_model = lambda: timm.create_model(args.model, num_classes=6)  # noqa: E731
    out = style_gap(make_model, args.train_style, args.train_length, args.val_length, args.steps, args.batch, args.lr,
                    args.seed, args.au_weight)
    out['model'] = args.model
    print(json.dumps(out, indent=1))
    return out


if __name__ == '__main__':
    main()
