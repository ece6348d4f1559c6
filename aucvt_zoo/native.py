"""A CPU kernel PyTorch lacks, built once with the system C compiler on first use; optional, with a fallback.

PyTorch's bf16 PReLU runs at less than half the speed of a copy of the same map, and nothing can fuse it into
the oneDNN convolution before it (oneDNN's PReLU post-op is not exposed). IR-50 has a PReLU in its stem and in
every unit: in the `pack` fast path of `aucvt_openface` at batch 32, PReLU and `fast.BnConv`'s border
corrections took 28 of 236 ms. `prelu_` does both in one in-place pass over the convolution's output
(csrc/prelu.c: plain C, AVX512-BF16 where the CPU has it; no PyTorch headers, no pybind11, no ninja; it compiles
in about a second). On one core, for an 8 x 64 x 112 x 112 bf16 map: PyTorch's PReLU 2.06 ms, a copy 0.89 ms,
`prelu_` 0.63 ms. It runs in the calling thread (see csrc/prelu.c for why).

The library is compiled with `$CC` (default `cc`) and `-O3 -march=native` (without it if the compiler refuses)
into `$AUCVT_ZOO_CACHE` (default `$XDG_CACHE_HOME/aucvt_zoo` or `~/.cache/aucvt_zoo`; a private temporary folder
if that cannot be written), named by a hash of the source, the compiler, the flags and the CPU, so a cache shared between
different machines never loads a build for the wrong CPU. Without a compiler (or with `AUCVT_ZOO_NATIVE=0`)
`available()` is False, `unavailable_reason()` says why, and `prelu_` computes the same thing with PyTorch ops.
"""
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['available', 'unavailable_reason', 'library_path', 'prelu_']

SOURCE = Path(__file__).resolve().parent / 'csrc' / 'prelu.c'
_FLAGS = ('-O3', '-fPIC', '-shared')
_TUNE = ('-march=native',)

_lock = threading.Lock()
_state = {'loaded': False, 'lib': None, 'path': None, 'reason': 'not built yet'}


def _cache_dir() -> Path:
    if os.environ.get('AUCVT_ZOO_CACHE'):
        return Path(os.environ['AUCVT_ZOO_CACHE'])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'aucvt_zoo'


def _cpu_id() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU model and its feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('model name', 'flags', 'Features', 'CPU part')):
                    parts.append(line.strip())
                if line.strip() == '':
                    break  # the first processor describes them all
    except OSError:
        parts.append(platform.processor())
    return '\n'.join(parts)


def _compile(cc: str, flags, out: Path) -> Optional[str]:
    """Compile SOURCE into `out`; None on success, else the compiler's complaint."""
    tmp = out.with_name(f'{out.name}.{os.getpid()}.{threading.get_ident()}.tmp')
    cmd = [cc, *flags, str(SOURCE), '-o', str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return f'{" ".join(cmd)}: {err}'
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return f'{" ".join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[:300]}'
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    return None


def _build() -> None:
    if os.environ.get('AUCVT_ZOO_NATIVE', '1').strip().lower() in ('0', 'false', 'no', 'off'):
        _state['reason'] = 'disabled by AUCVT_ZOO_NATIVE=0'
        return
    cc = os.environ.get('CC', 'cc')
    source = SOURCE.read_bytes()
    errors = []
    for flags in (_FLAGS + _TUNE, _FLAGS):  # a compiler without -march=native still gets a portable build
        key = hashlib.sha256(b'\0'.join([source, cc.encode(), ' '.join(flags).encode(), _cpu_id().encode()]))
        name = f'prelu-{key.hexdigest()[:16]}.so'
        # the cache, else a private temporary folder made for this process (never a predictable shared path in
        # /tmp: whoever can write there could plant the library we load)
        for folder in (_cache_dir(), None):
            try:
                folder = Path(tempfile.mkdtemp(prefix='aucvt_zoo-')) if folder is None else folder
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                errors.append(f'cache folder {folder}: {err}')
                continue
            path = folder / name
            if not path.exists():
                if not os.access(folder, os.W_OK):
                    errors.append(f'cache folder {folder} is not writable')
                    continue
                error = _compile(cc, flags, path)
                if error:
                    errors.append(error)
                    break  # the same compiler fails the same way in another folder
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                errors.append(f'loading {path}: {err}')
                continue
            for fn in (lib.aucvt_prelu_bf16, lib.aucvt_prelu_f32):  # (y, weight, add, n, h * w, c)
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
                fn.restype = None
            _state.update(lib=lib, path=path, reason='')
            return
    _state['reason'] = ('could not build the native PReLU kernel (' + '; '.join(errors) +
                        '); install a C compiler (or set CC) to get it, PyTorch ops are used meanwhile')


def _library() -> Optional[ctypes.CDLL]:
    if not _state['loaded']:
        with _lock:
            if not _state['loaded']:
                _build()
                _state['loaded'] = True
    return _state['lib']


def available() -> bool:
    """True when the kernel is built (building it now if needed) and will be used by `prelu_`."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    _library()
    return _state['reason']


def library_path() -> Optional[Path]:
    """The compiled library in use, or None."""
    _library()
    return _state['path']


def prelu_(y: torch.Tensor, weight: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = PReLU(y + add) with per-channel slopes `weight`, in place where the native kernel can run.

    Args:
        y: (N, C, H, W), a map nothing else reads afterwards (a fresh convolution output): the kernel runs on
            a channels-last contiguous bf16 or fp32 CPU tensor and overwrites it. Otherwise the result is
            computed with PyTorch ops and returned (y is then left unchanged).
        weight: (C,) slopes, float32 (the slopes of a bf16 model, widened exactly).
        add: None, or a (1, C, H, W) map added to every image first, e.g. `BnConv`'s border correction.
    Returns:
        the result: `y` itself when computed in place.
    """
    lib = _library()
    n, c = y.shape[0], y.shape[1]
    fits = (lib is not None and y.device.type == 'cpu' and y.dim() == 4 and y.dtype in (torch.bfloat16, torch.float32)
            and y.is_contiguous(memory_format=torch.channels_last) and weight.dtype == torch.float32
            and weight.is_contiguous() and weight.numel() == c and not y.requires_grad)
    if fits and add is not None:
        if add.shape != (1, *y.shape[1:]):
            raise ValueError(f'add must be (1, C, H, W) = {(1, *y.shape[1:])}, not {tuple(add.shape)}.')
        add = add.to(y.dtype).contiguous(memory_format=torch.channels_last)
    if not fits:
        v = y if add is None else y + add.to(y.dtype)
        return F.prelu(v, weight.to(v.dtype))
    fn = lib.aucvt_prelu_bf16 if y.dtype == torch.bfloat16 else lib.aucvt_prelu_f32
    fn(y.data_ptr(), weight.data_ptr(), None if add is None else add.data_ptr(), n, y.shape[2] * y.shape[3], c)
    return y
