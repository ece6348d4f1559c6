"""The native PReLU kernel (aucvt_zoo/native.py, csrc/prelu.c): results, fallbacks, and how it is built."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aucvt_zoo import native

ROOT = Path(__file__).resolve().parent.parent

needs_kernel = pytest.mark.skipif(not native.available(), reason=f'no native kernel: {native.unavailable_reason()}')


def _map(n, c, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, c, h, h, generator=g) * 3
    y[0, 0, 0, :3] = torch.tensor([float('nan'), float('inf'), -float('inf')])
    return y.to(dtype).contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
@pytest.mark.parametrize('c', [64, 19])  # 19: the channels left over after 16-wide vectors run the scalar loop
def test_prelu_matches_pytorch_bit_for_bit_in_place(dtype, c):
    y = _map(3, c, 5, dtype)
    w = (torch.rand(c, generator=torch.Generator().manual_seed(1)) - 0.3).to(dtype)  # negative slopes too
    expected = F.prelu(y, w)
    out = native.prelu_(y, w.float())
    assert out.data_ptr() == y.data_ptr(), 'computed in place'
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_prelu_with_a_map_added_to_every_image(dtype):
    y, add = _map(4, 21, 6, dtype), _map(1, 21, 6, dtype, seed=2)
    w = torch.rand(21, generator=torch.Generator().manual_seed(3))
    # the sum is formed in float and rounded once, after the PReLU
    expected = F.prelu(y.float() + add.float(), w).to(dtype)
    out = native.prelu_(y, w, add)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r'add must be \(1, C, H, W\)'):
        native.prelu_(y, w, add[:, :, :3])


def test_inputs_the_kernel_does_not_take_are_computed_by_pytorch_and_left_unchanged():
    w = torch.rand(8)
    for y in (torch.randn(2, 8, 4, 4),  # NCHW-contiguous, not channels-last
              torch.randn(2, 8, 4, 4).to(torch.float16).contiguous(memory_format=torch.channels_last)):
        before = y.clone()
        out = native.prelu_(y, w)
        torch.testing.assert_close(out, F.prelu(y, w.to(y.dtype)))
        assert torch.equal(y, before) and out.data_ptr() != y.data_ptr()


_PROBE = '''
import torch, torch.nn.functional as F
from aucvt_zoo import native
print(native.available())
print(native.unavailable_reason())
print(native.library_path())
y = torch.randn(2, 16, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
w = torch.rand(16).to(torch.bfloat16).float()  # slopes of a bf16 model
expected = F.prelu(y, w.to(y.dtype))
assert torch.equal(native.prelu_(y, w), expected)
'''


def _probe(tmp_path, **env):
    full = dict(os.environ, PYTHONPATH=str(ROOT))
    full.update({'AUCVT_ZOO_CACHE': str(tmp_path / 'cache'), **env})
    proc = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_switched_off_or_without_a_compiler_it_says_why_and_still_computes(tmp_path):
    available, reason, path = _probe(tmp_path, AUCVT_ZOO_NATIVE='0')
    assert (available, path) == ('False', 'None') and 'AUCVT_ZOO_NATIVE=0' in reason
    available, reason, path = _probe(tmp_path, CC=str(tmp_path / 'no-such-compiler'))
    assert (available, path) == ('False', 'None')
    assert 'no-such-compiler' in reason and 'C compiler' in reason


@needs_kernel
def test_built_once_into_the_cache_and_portably_where_march_native_fails(tmp_path):
    available, _, path = _probe(tmp_path)
    assert available == 'True' and Path(path).parent == tmp_path / 'cache'
    mtime = Path(path).stat().st_mtime_ns
    assert _probe(tmp_path)[2] == path and Path(path).stat().st_mtime_ns == mtime, 'second process reuses it'
    # a compiler that refuses -march=native gets the portable build (auto-vectorised C, no intrinsics)
    cc = tmp_path / 'cc-without-native'
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && exit 1; done\nexec cc "$@"\n')
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    available, _, portable = _probe(tmp_path, CC=str(cc))
    assert available == 'True' and portable != path


@needs_kernel
def test_a_cache_folder_it_cannot_make_falls_back_to_a_private_temporary_one(tmp_path):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    available, _, path = _probe(tmp_path, AUCVT_ZOO_CACHE=str(blocker / 'cache'))
    assert available == 'True' and Path(path).parent.name.startswith('aucvt_zoo-')
    assert (Path(path).parent.stat().st_mode & 0o077) == 0, 'private to this user'
