"""End-to-end prediction speed on CPU (faces/s, split into decode / detection / alignment / model) and the peak
memory of video prediction against video length (it should not grow: frames are streamed).

    python benchmarks/predict_speed.py                       # aucvt_openface (random weights), batch 32
    python benchmarks/predict_speed.py --model aucvt_openface_tiny --images 32 --video-frames 20 80

Inputs are generated (cartoon faces with known landmarks, 256x256, one face each), so nothing downloads. Speed
is a measurement, not a test; on a shared machine run it when the cores are idle and say how many threads.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))


def _faces(n, size=256):
    from test_align import draw_face
    from aucvt_zoo.align import ARCFACE_TEMPLATE
    rng = np.random.default_rng(0)
    for i in range(n):
        scale = rng.uniform(1.1, 1.6)
        offset = rng.uniform([20, 10], [size - 112 * scale - 20, size - 112 * scale - 20])
        yield np.array(draw_face(ARCFACE_TEMPLATE * scale + offset, size=(size, size)))


def _video_child(path, model, frames):
    """Run in a fresh process: stream a video through the predictor, print peak RSS (MiB) as JSON."""
    from aucvt_zoo.predict import Predictor
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', '2')))
    p = Predictor(model, device='cpu', batch_size=32, pretrained=False)
    start = time.perf_counter()
    n = sum(1 for r in p.predict_video(path) if r.face >= 0)
    print(json.dumps(dict(frames=frames, faces=n, seconds=time.perf_counter() - start,
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='aucvt_openface')
    ap.add_argument('--images', type=int, default=64)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--video-frames', type=int, nargs='*', default=[25, 100])
    ap.add_argument('--child', nargs=2, metavar=('VIDEO', 'FRAMES'), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return _video_child(args.child[0], args.model, int(args.child[1]))

    from PIL import Image
    from aucvt_zoo.predict import Predictor, iter_sources
    with tempfile.TemporaryDirectory() as tmp:
        for i, face in enumerate(_faces(args.images)):
            Image.fromarray(face).save(os.path.join(tmp, f'{i:04d}.jpg'), quality=92)
        p = Predictor(args.model, device='cpu', batch_size=args.batch_size, pretrained=False)
        list(p.iter_paths(iter_sources([tmp])))  # warm-up: first-call allocations, MTCNN weight load
        p.timings = dict.fromkeys(p.timings, 0.)
        start = time.perf_counter()
        rows = list(p.iter_paths(iter_sources([tmp])))
        total = time.perf_counter() - start
        faces = sum(r.face >= 0 for r in rows)
        split = ', '.join(f'{k} {v / max(faces, 1) * 1000:.1f} ms/face' for k, v in p.timings.items())
        print(f'{args.model}, batch {args.batch_size}, {args.threads} threads, {args.images} images 256x256: '
              f'{faces} faces in {total:.2f} s = {faces / total:.1f} faces/s ({split})')

        try:
            import av
        except ImportError:
            print('video memory: skipped (PyAV not installed)')
            return
        for n in args.video_frames:
            path = os.path.join(tmp, f'clip{n}.mkv')
            with av.open(path, 'w') as container:  # lossless, so every drawn face survives encoding
                stream = container.add_stream('ffv1', rate=25)
                stream.width = stream.height = 256
                stream.pix_fmt = 'bgr0'
                for face in _faces(n):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(face, format='rgb24')))
                container.mux(stream.encode())
            out = subprocess.run([sys.executable, __file__, '--model', args.model, '--child', path, str(n)],
                                 capture_output=True, text=True, env=dict(os.environ, BENCH_THREADS=str(args.threads)))
            if out.returncode:
                print(out.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f'video {n} frames: {r["faces"]} faces, {r["seconds"]:.1f} s, peak RSS {r["peak_rss_mib"]:.0f} MiB')


if __name__ == '__main__':
    main()
