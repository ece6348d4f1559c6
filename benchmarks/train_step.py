"""Images per second of one training step (forward of both heads, joint loss, backward, SGD) of a zoo model.

    python benchmarks/train_step.py                                  # aucvt_openface, batch 32, CPU
    python benchmarks/train_step.py --model aucvt_openface_tiny --device cuda --amp

The step is the trainer's: `BothHeads` forward, `JointLoss` on expression labels and half-labelled AU targets,
backward, SGD with the paper's momentum and weight decay groups. Data loading is left out (random tensors), so
the number is the model's cost, not the disk's. Prints one JSON line with every repeat and the median.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from timm.optim import param_groups_weight_decay

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from aucvt_zoo.losses import JointLoss  # noqa: E402
from aucvt_zoo.train import BothHeads, create_model, data_config, model_au_names  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='aucvt_openface')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=3, help='steps timed per repeat')
    p.add_argument('--repeats', type=int, default=5, help='repeats; the median is reported')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first (allocator, kernels)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch CPU threads')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device = torch.device(args.device)
    model = create_model(args.model).to(device).train()
    net = BothHeads(model)
    optimizer = torch.optim.SGD(param_groups_weight_decay(
        model, 5e-4, no_weight_decay_list=getattr(model, 'no_weight_decay', set)()), lr=1e-4, momentum=0.9)
    criterion = JointLoss()
    size = data_config(model)['input_size']
    x = torch.randn(args.batch_size, *size, device=device)
    expressions = torch.randint(0, 6, (args.batch_size,), device=device)
    aus = torch.randint(0, 2, (args.batch_size, len(model_au_names(model))), device=device).float()
    aus[::2] = float('nan')  # half the images without AU labels, as when an auxiliary set is mixed in

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            expr_logits, au_logits = net(x)
        loss, _ = criterion(expr_logits, au_logits, expressions, aus)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        rates.append(args.batch_size * args.steps / (time.perf_counter() - t))
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    print(json.dumps(dict(
        model=args.model, batch_size=args.batch_size, device=str(device), threads=args.threads, amp=args.amp,
        images_per_s=round(statistics.median(rates), 2), repeats=[round(r, 2) for r in rates],
        load_average_1min=load, torch=torch.__version__)))


if __name__ == '__main__':
    main()
