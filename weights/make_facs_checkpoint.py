"""Reproduce the shipped `aucvt_openface_tiny.facs` checkpoint from its seed, with the project's own tools.

    python weights/make_facs_checkpoint.py [--work runs/facs] [--check]

1. `python -m aucvt_zoo.train` with no data arguments (the built-in faces, the demo recipe) and seed 0, on the CPU
   with 2 threads and no loader workers, so every number is computed in the same order;
2. `python -m aucvt_zoo.convert checkpoint <run>/final` into a Hub folder (config, safetensors, card);
3. copies its `model.safetensors` to `weights/aucvt_openface_tiny.facs.safetensors` and prints the sha256 and the
   metrics for `weights/manifest.json`. With `--check` it only compares the rebuilt file with the shipped one.

Bit-for-bit holds for the same torch build and CPU kind (float summation order differs across oneDNN kernels);
the trained-on-rendered-faces caveat of the manifest applies: it is a demonstration, not a model of real faces.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / 'aucvt_openface_tiny.facs.safetensors'
TRAIN_ARGS = ['--seed', '0', '--workers', '0', '--device', 'cpu']


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', default='runs/facs', help='folder for the training run and the Hub folder')
    parser.add_argument('--check', action='store_true', help='rebuild and compare with the shipped file only')
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from aucvt_zoo import convert, train
    from aucvt_zoo.hub import sha256_file

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    results = train.main(TRAIN_ARGS + ['--output', str(work / 'run')])
    convert.main(['checkpoint', str(work / 'run' / 'final'), '--out', str(work / 'hub'),
                  '--entry', 'aucvt_openface_tiny.facs'])
    built = work / 'hub' / 'model.safetensors'
    digest = sha256_file(built)
    if args.check:
        same = SHIPPED.exists() and digest == sha256_file(SHIPPED)
        print(f'rebuilt {digest}; shipped {sha256_file(SHIPPED) if SHIPPED.exists() else "missing"}: '
              f'{"identical" if same else "DIFFERENT"}')
        return 0 if same else 1
    shutil.copyfile(built, SHIPPED)
    final = results['final']['metrics']
    print(json.dumps(dict(
        sha256=digest, size=SHIPPED.stat().st_size, train_command='python weights/make_facs_checkpoint.py',
        metrics=dict(f1=final['f1'], accuracy=final['accuracy'], mean_au_f1=final.get('mean_au_f1'),
                     protocol='600 "real"-style built-in faces (seed 1), final step'),
    ), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
