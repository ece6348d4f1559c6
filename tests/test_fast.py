"""Fast inference paths: exact BatchNorm folding, numerics of each path against fp32 eager, path choice, allocator."""
import os

import pytest
import timm
import torch
import torch.nn as nn

import aucvt_zoo  # noqa: F401  (registers the zoo models with timm)
from aucvt_zoo import benchmark, fast, native
from aucvt_zoo.fast import FastPath


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, as trained weights have.

    Freshly initialised BN (mean 0, var 1, weight 1, bias 0) is an identity; folding it proves nothing.
    """
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _assert_same_outputs(fm, model: nn.Module, x: torch.Tensor, tol: float) -> None:
    """`fm.forward_with_aus(x)` equals `model`'s fp32 eager outputs, expression and AU logits, to `tol`."""
    with torch.no_grad():
        ref_expr, ref_aus = model.forward_with_aus(x)
    expr, aus = fm.forward_with_aus(x)
    torch.testing.assert_close(expr, ref_expr, atol=tol, rtol=tol)
    torch.testing.assert_close(aus, ref_aus, atol=tol, rtol=tol)


@pytest.fixture(scope='module')
def tiny_aucvt():
    torch.manual_seed(0)
    return _with_bn_statistics(timm.create_model('aucvt_openface_tiny'))


def test_fold_removes_batchnorm_and_is_exact(tiny_aucvt):
    x = torch.randn(3, 3, 112, 112)
    folded = fast.fold_batchnorm(tiny_aucvt, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_aucvt.modules()), 'the original must be left alone'
    with torch.no_grad():
        _assert_same_outputs(folded, tiny_aucvt, x, 1e-5)


def test_leading_bn_fold_is_exact_at_the_border():
    # The BN before a zero-padded conv cannot become a plain bias: the border sees zeros, not the BN shift.
    # A large shift makes a border error obvious; other input sizes than the prepared one use the on-the-fly map.
    # IR units' 3x3 convs (a one-pixel ring) and a wider ring.
    torch.manual_seed(0)
    for kernel, pad in ((3, 1), (5, 2)):
        bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 5, kernel, padding=pad, bias=False)
        _with_bn_statistics(nn.Sequential(bn))
        bn.bias.data.fill_(3.0)
        folded = fast.BnConv(bn, conv, (6, 6)).eval()
        assert folded.ring == pad
        for size in (6, 9):
            x = torch.randn(2, 4, size, size)
            with torch.no_grad():
                torch.testing.assert_close(folded(x), conv(bn(x)), atol=1e-5, rtol=1e-5)


def test_fold_ir50_any_input_size():
    torch.manual_seed(0)
    model = _with_bn_statistics(timm.create_model('ir50_tiny'))
    folded = fast.fold_batchnorm(model)
    x = torch.randn(2, 3, 64, 80)  # not the prepared 112x112: shift maps are computed for this size
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', [
    'fp32', 'fp32+channels_last+fold', 'fp32+channels_last+fold+pack', 'bf16', 'bf16+channels_last+fold',
    'bf16+channels_last+fold+pack',
])
def test_paths_agree_with_fp32(tiny_aucvt, name):
    path = FastPath.from_name(name)
    if path.precision == 'bf16' and not fast.bf16_supported(torch.device('cpu')):
        pytest.skip('no native bf16 on this CPU')
    x = torch.randn(8, 3, 112, 112)
    fm = fast.prepare(tiny_aucvt, path, example=x)
    agreement = fast.check_agreement(fm, x, model=tiny_aucvt)
    expr, aus = fm.forward_with_aus(x)
    assert expr.dtype == aus.dtype == torch.float32
    assert aus.shape == (8, len(tiny_aucvt.au_names))
    if path.exact:
        assert agreement.max_abs_diff < 1e-4 and agreement.max_abs_diff_aus < 1e-4
    else:
        # bf16 keeps 8 mantissa bits: the error is ~1% of the logit scale, and not zero
        assert 0 < agreement.max_abs_diff < 0.05 * tiny_aucvt(x).abs().max().item()
    assert agreement.argmax_agreement == 1.0


def test_pack_replaces_every_conv_and_linear_and_fuses(tiny_aucvt):
    x = torch.randn(3, 3, 112, 112)
    fm = fast.prepare(tiny_aucvt, FastPath('fp32', channels_last=True, fold=True, pack=True), example=x)
    mods = list(fm.model.modules())
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in mods), 'every conv/linear that runs is packed'
    units = [m for m in mods if isinstance(m, fast.FoldedBottleneckIR)]
    assert units and all(isinstance(u.residual[2], fast.PackedConv2d) for u in units)  # residual add fused
    ffns = [m for m in mods if isinstance(m, aucvt_zoo.models.cvt.ConvFfn)]
    assert ffns and all(m.dwconv.unary == 'gelu' and isinstance(m.act, nn.Identity) for m in ffns)
    assert not any(isinstance(m, nn.GELU) for m in mods)
    blocks = [m for m in mods if isinstance(m, fast.PackedBlock)]  # residual adds inside proj and fc2
    assert blocks and not any(isinstance(m, aucvt_zoo.models.cvt.Block) for m in mods)
    if native.available():  # every PReLU (stem and units) in place, the units' border corrections with it
        assert sum(isinstance(m, fast.NativePReLU) for m in mods) == len(units) + 1
        assert not any(isinstance(m, nn.PReLU) for m in mods)
    chunked = [m for m in mods if isinstance(m, fast.Chunked)]  # stem + first IR stage, in slices of 8
    assert len(chunked) == 1 and isinstance(fm.model.trunk.stages[0], nn.Identity)
    # packed for batch 3, run at 1, 5 and 19 (three slices): a packed weight suits any batch size
    for batch in (1, 5, 19):
        _assert_same_outputs(fm, tiny_aucvt, torch.randn(batch, 3, 112, 112), 1e-4)


def test_pack_works_on_a_timm_model_and_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model = _with_bn_statistics(timm.create_model('resnet18', num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    fm = fast.prepare(model, FastPath('fp32', channels_last=True, pack=True), example=x)
    assert sum(isinstance(m, fast.PackedConv2d) for m in fm.model.modules()) == 20
    with torch.no_grad():
        torch.testing.assert_close(fm(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='compile'):
        FastPath('bf16', pack=True, compile=True)
    with pytest.raises(ValueError, match='CPU'):
        fast.prepare(nn.Linear(2, 2, device='meta'), FastPath('fp32', pack=True))
    assert FastPath('bf16', True, True, pack=True) in fast.candidate_paths(torch.device('cpu'))


def test_streams_split_the_batch_between_threads_and_leave_the_callers_threads_alone(tiny_aucvt):
    import threading
    fm = fast.prepare(tiny_aucvt, FastPath('fp32', channels_last=True, fold=True, pack=True, streams=2))
    seen = []
    fm.model.trunk.stem.register_forward_pre_hook(
        lambda mod, args: seen.append((threading.get_ident(), args[0].shape[0])))
    threads = torch.get_num_threads()
    for batch in (5, 1):
        seen.clear()
        _assert_same_outputs(fm, tiny_aucvt, torch.randn(batch, 3, 112, 112), 1e-4)
        if batch == 5:  # halves 3 + 2, each in its own worker thread
            assert sorted(n for _, n in seen) == [2, 3]
            assert len({t for t, _ in seen}) == 2 and threading.get_ident() not in {t for t, _ in seen}
        else:  # one image is not split
            assert seen == [(threading.get_ident(), 1)]
    assert torch.get_num_threads() == threads
    assert FastPath.from_name('bf16+channels_last+fold+pack+streams2').streams == 2
    for bad in (dict(streams=0), dict(streams=2, compile=True)):
        with pytest.raises(ValueError, match='streams'):
            FastPath('fp32', **bad)
    with pytest.raises(ValueError, match='CPU threads'):
        fast.prepare(nn.Linear(2, 2, device='meta'), FastPath('fp32', streams=2))


def test_batch_size_one(tiny_aucvt):
    fm = fast.prepare(tiny_aucvt, FastPath('fp32', channels_last=True, fold=True))
    expr, aus = fm.forward_with_aus(torch.randn(1, 3, 112, 112))
    assert expr.shape == (1, 6) and aus.shape == (1, 16)


def test_path_names_round_trip():
    for path in fast.candidate_paths(torch.device('cpu'), allow_compile=True):
        assert FastPath.from_name(path.name) == path
    with pytest.raises(ValueError, match='switch'):
        FastPath.from_name('bf16+turbo')
    with pytest.raises(ValueError, match='precision'):
        FastPath('int4')
    with pytest.raises(ValueError, match='CUDA'):
        fast.prepare(nn.Linear(2, 2), FastPath('fp16'))


def test_choose_fast_path_rejects_inexact_paths_and_obeys_fp32(tiny_aucvt):
    x = torch.randn(8, 3, 112, 112)
    # A rule no reduced-precision path can meet: only fp32 paths may be chosen, and the report says so.
    choice = fast.choose_fast_path(tiny_aucvt, x, max_diff=1e-7, timing_runs=1)
    assert choice.path.exact
    rejected = [c for c in choice.candidates if not c.path.exact and not c.error]
    assert rejected and not any(c.accepted for c in rejected)
    assert choice.path.name in choice.summary()
    assert ('native PReLU kernel (pack): ' + ('yes' if native.available() else 'no')) in choice.summary()
    forced = fast.choose_fast_path(tiny_aucvt, x, precision='fp32', timing_runs=1)
    assert {c.path.precision for c in forced.candidates} == {'fp32'}
    torch.testing.assert_close(forced.model(x), tiny_aucvt(x), atol=1e-4, rtol=1e-4)


def test_choose_fast_path_picks_the_fastest_accepted(tiny_aucvt):
    x = torch.randn(4, 3, 112, 112)
    choice = fast.choose_fast_path(tiny_aucvt, x, timing_runs=1, max_diff=1.0, min_agreement=0.0)
    accepted = [c for c in choice.candidates if c.accepted]
    assert choice.path == max(accepted, key=lambda c: c.images_per_s).path


def test_compiled_path_matches_eager(tiny_aucvt):
    if os.environ.get('AUCVT_ZOO_SKIP_COMPILE_TESTS'):
        pytest.skip('AUCVT_ZOO_SKIP_COMPILE_TESTS is set')
    x = torch.randn(2, 3, 112, 112)
    fm = fast.prepare(tiny_aucvt, FastPath('fp32', channels_last=True, fold=True, compile=True), example=x)
    assert fm.compile_time_s > 0
    agreement = fast.check_agreement(fm, x, model=tiny_aucvt)
    assert agreement.max_abs_diff < 1e-4 and agreement.max_abs_diff_aus < 1e-4


def test_forward_has_no_graph_breaks(tiny_aucvt):
    folded = fast._BothHeads(fast.fold_batchnorm(tiny_aucvt), channels_last=True)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(folded)(torch.randn(2, 3, 112, 112))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_allocator_env(tmp_path):
    env = fast.allocator_env('glibc', base={'LD_PRELOAD': '/x/libjemalloc.so.2:/y/libother.so', 'A': '1'})
    assert env == {'LD_PRELOAD': '/y/libother.so', 'A': '1'}
    lib = fast.find_allocator('jemalloc')
    if lib is None:
        with pytest.raises(ValueError, match='apt-get install libjemalloc2'):
            fast.allocator_env('jemalloc', base={})
    else:
        assert fast.allocator_env('jemalloc', base={})['LD_PRELOAD'] == lib


def test_benchmark_rows_and_outputs(tmp_path):
    results = benchmark.main([
        '--model', 'aucvt_raf_tiny', 'ir50_tiny', '--batch-size', '2', '--path', 'fp32', 'fp32+fold',
        '--mode', 'inference', 'train', '--warmup', '1', '--runs', '2', '--min-run-s', '0',
        '--json', str(tmp_path / 'b.json'), '--csv', str(tmp_path / 'b.csv')])
    # fold is inference-only, so train rows have fp32 only: 2 models x (2 inference + 1 train)
    assert len(results) == 6 and not any(r.error for r in results)
    by_key = {(r.model, r.mode, r.path): r for r in results}
    r = by_key[('aucvt_raf_tiny', 'inference', 'fp32')]
    model = timm.create_model('aucvt_raf_tiny')
    assert r.params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)
    assert r.gflops_per_img > 0 and r.img_per_s > 0 and r.peak_mem_mb > 0 and r.pct_of_peak > 0
    assert r.argmax_agreement == 1.0 and r.max_abs_diff == 0
    train = by_key[('aucvt_raf_tiny', 'train', 'fp32')]
    assert 2.5 < train.gflops_per_img / r.gflops_per_img < 3.5, 'backward costs about twice the forward'
    import csv
    import json
    written = json.load(open(tmp_path / 'b.json'))
    assert len(written['results']) == 6
    assert written['native_prelu'] == ('yes' if native.available() else native.unavailable_reason())
    assert len(list(csv.DictReader(open(tmp_path / 'b.csv')))) == 6
    table = benchmark.markdown_table(results)
    assert table.count('\n') == 7 and '1.00x' in table


def test_flop_count_matches_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert benchmark.count_flops(conv, torch.randn(1, 3, 10, 10)) == 2 * 8 * 3 * 9 * 10 * 10
    # attention through scaled_dot_product_attention on the CPU: q @ k.T and p @ v, 2 FLOPs per multiply-add;
    # torch's own counter leaves this CPU kernel out (it would count 0)
    q = torch.randn(2, 4, 49, 16, requires_grad=True)
    attention = benchmark.count_flops(_Attend(), q)
    assert attention == 2 * (2 * 2 * 4 * 49 * 49 * 16)
    assert benchmark.count_flops(_Attend(), q, train=True) > 3 * attention  # backward recomputes and does more


class _Attend(nn.Module):
    def forward(self, q):
        return nn.functional.scaled_dot_product_attention(q, q, q)


_FAULTS_SCRIPT = '''
import resource, sys, torch
from aucvt_zoo import fast
if sys.argv[1] == "tuned":
    assert fast.tune_glibc_malloc()
for _ in range(3):  # warm up: the tuned heap grows to hold one buffer, then is reused
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)   # 64 MiB: above any glibc mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def test_tune_glibc_malloc_stops_refaulting():
    import subprocess
    import sys
    env = fast.allocator_env('glibc')
    env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get('PYTHONPATH', '')])
    faults = {mode: int(subprocess.run([sys.executable, '-c', _FAULTS_SCRIPT, mode], env=env, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ('plain', 'tuned')}
    # glibc maps and unmaps each buffer: it faults in again every time, at least once per (huge) page, i.e.
    # >= 32 faults per 64 MiB even with transparent huge pages; a tuned heap keeps the buffer and reuses it, so
    # it faults in (at most) its first round only: a fifth of the plain count or less (seen: 16,384 vs 81,925).
    assert faults['plain'] >= 5 * 32, faults
    assert faults['tuned'] <= max(64, faults['plain'] // 3), faults


def test_bf16_autocast_training_step_matches_fp32():
    if not fast.bf16_supported(torch.device('cpu')):
        pytest.skip('no native bf16 on this CPU')
    torch.manual_seed(0)
    model = timm.create_model('aucvt_raf_tiny').train()
    x, target = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 3])
    grads = {}
    for precision in ('fp32', 'bf16'):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            expr, aus = model.forward_with_aus(x)
            loss = nn.functional.cross_entropy(expr.float(), target) + aus.float().sigmoid().mean()
        loss.backward()
        grads[precision] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (loss32, g32), (loss16, g16) = grads['fp32'], grads['bf16']
    assert loss16 == pytest.approx(loss32, rel=0.02)
    cosine = nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert 0.98 < cosine < 1.0  # bf16 moved the gradient a little, not its direction
