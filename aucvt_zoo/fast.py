"""Fast inference paths for zoo (and timm) models, each checked against fp32 eager before it is used.

A path combines independent switches:

- precision: 'fp32', 'bf16' (autocast; AMX on Xeons that have it, tensor cores on CUDA) or 'fp16' (CUDA only);
- channels_last: NHWC activations for the convolutional trunk (oneDNN and cuDNN are fastest in NHWC);
- fold: BatchNorm folded into the neighbouring convolutions, and IR-50's 1x1 max-pool shortcuts turned into
  strided views (see `fold_batchnorm`); exact up to float rounding;
- pack (CPU): convolution and linear weights reordered once into oneDNN's blocked layout (eager PyTorch
  reorders them on every call, which at batch 1 costs more than the arithmetic), with the IR units' residual
  add and the Conv-FFN's GELU fused into the convolution before them, and IR-50's PReLUs run in place by a small
  C kernel built on first use where a C compiler is present (`aucvt_zoo.native`); exact up to float rounding;
- streams (CPU): the batch is split in `streams` parts run at once from as many threads, each with its share of
  the cores (two half batches on one core each beat one batch on two cores: less synchronisation between
  cores, and each core's memory-bound passes run on its own half);
- compile: `torch.compile` with inductor freezing (weights become constants, so weight casts and conv-BN
  folding happen once at compile time); its compile time is reported. It packs weights itself, so it does not
  combine with `pack`.

The predict path calls one function::

    from aucvt_zoo.fast import choose_fast_path
    choice = choose_fast_path(model, check_batch)       # check_batch: (N, 3, 112, 112) real, normalised faces
    expression_logits, au_logits = choice.model.forward_with_aus(faces)
    print(choice.path.name, choice.summary())

`choose_fast_path` times every candidate path on the check batch and returns the fastest one whose expression
argmax agrees with fp32 eager on >= 99.5% of the check batch and whose expression logits differ by at most 0.02
(`ACCEPT_AGREEMENT`, `ACCEPT_MAX_DIFF`). `precision='fp32'` restricts it to exact fp32 paths. The returned
`FastModel` is inference-only: it runs under `torch.inference_mode` and returns fp32 logits whatever the path.
"""
import copy
import ctypes
import dataclasses
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .models.cvt import Block, ConvFfn
from .models.ir50 import BottleneckIR, IResNet

__all__ = [
    'ACCEPT_AGREEMENT', 'ACCEPT_MAX_DIFF', 'FastPath', 'FastModel', 'Agreement', 'CandidateReport', 'FastChoice',
    'bf16_supported', 'pack_supported', 'candidate_paths', 'fold_batchnorm', 'pack_weights', 'PackedConv2d',
    'PackedLinear', 'PackedBlock', 'NativePReLU', 'Chunked', 'prepare', 'check_agreement', 'choose_fast_path',
    'find_allocator', 'allocator_env', 'tune_glibc_malloc',
]

# The acceptance rule of the predict path (issue 6): a fast path may change a frame's predicted expression on
# at most 1 in 200 frames of the check batch, and move no expression logit by more than 0.02.
ACCEPT_AGREEMENT = 0.995
ACCEPT_MAX_DIFF = 0.02

_PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclasses.dataclass(frozen=True)
class FastPath:
    """One combination of the fast-path switches."""
    precision: str = 'fp32'
    channels_last: bool = False
    fold: bool = False
    compile: bool = False
    pack: bool = False
    streams: int = 1

    def __post_init__(self):
        if self.precision not in _PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(_PRECISIONS)}, not {self.precision!r}.')
        if self.pack and self.compile:
            raise ValueError('pack and compile do not combine: compiling with freezing packs the weights itself.')
        if not isinstance(self.streams, int) or self.streams < 1:
            raise ValueError(f'streams must be a positive int, not {self.streams!r}.')
        if self.streams > 1 and self.compile:
            raise ValueError('streams and compile do not combine (a compiled model is not run from several threads).')

    @property
    def name(self) -> str:
        parts = [self.precision]
        parts += ['channels_last'] if self.channels_last else []
        parts += ['fold'] if self.fold else []
        parts += ['pack'] if self.pack else []
        parts += ['compile'] if self.compile else []
        parts += [f'streams{self.streams}'] if self.streams > 1 else []
        return '+'.join(parts)

    @property
    def exact(self) -> bool:
        """True when the path computes in fp32 (differences are float rounding only)."""
        return self.precision == 'fp32'

    @classmethod
    def from_name(cls, name: str) -> 'FastPath':
        """Parse a name such as 'bf16+channels_last+fold+pack' (the form `name` gives)."""
        parts = name.split('+')
        flags = set(parts[1:])
        streams = [f for f in flags if f.startswith('streams') and f[len('streams'):].isdigit()]
        unknown = flags - {'channels_last', 'fold', 'pack', 'compile'} - set(streams)
        if unknown or len(streams) > 1:
            raise ValueError(
                f'Unknown fast-path switch(es) {sorted(unknown or streams)} in {name!r}; use '
                f'<fp32|bf16|fp16>[+channels_last][+fold][+pack|+compile][+streams<N>].')
        return cls(parts[0], 'channels_last' in flags, 'fold' in flags, 'compile' in flags, 'pack' in flags,
                   int(streams[0][len('streams'):]) if streams else 1)


def bf16_supported(device: torch.device) -> bool:
    """True when bf16 matmuls run natively on `device` (AVX512-BF16/AMX on CPU, Ampere or later on CUDA)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack_supported(device: torch.device) -> bool:
    """True when `pack` can run on `device`: a CPU with PyTorch built with oneDNN (mkldnn)."""
    return torch.device(device).type == 'cpu' and torch.backends.mkldnn.is_available()


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm folding


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift, per channel (computed in float64 to lose nothing)."""
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_then_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """BN(conv(x)) as one conv: scale the output filters, add the shift to the bias. Exact in real arithmetic."""
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


class StridedIdentity(nn.Module):
    """`MaxPool2d(kernel_size=1, stride=s)` without the copy: every s-th pixel, as a view (identity for s = 1)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x
        return x[:, :, ::self.stride, ::self.stride]


class BnConv(nn.Module):
    """conv(BN(x)) with zero padding, folded exactly.

    The BN scale goes into the filters (a scaled zero is still zero, so padding is unaffected). The BN shift
    is not simply a bias: the padded border sees zeros, not the shift, so its contribution conv(pad(shift * 1))
    is constant inside the map (that constant becomes the conv bias) and different on a ring as wide as the
    padding. The ring's correction depends only on the input size: precomputed for the size the model was
    prepared with (CVT models have a fixed size), computed on the fly for any other, and added in place to the
    ring only, so the fold costs four thin slices instead of a pass over the map.
    """

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, input_hw: Optional[Tuple[int, int]]):
        super().__init__()
        scale, shift = _bn_affine(bn)
        self.conv = copy.deepcopy(conv)
        weight = conv.weight.double()
        self.conv.weight = nn.Parameter((weight * scale.view(1, -1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
        # value of conv(shift * 1) where every tap is inside the image
        interior = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        if conv.bias is not None:
            interior = interior + conv.bias.double()
        self.conv.bias = nn.Parameter(interior.to(conv.weight.dtype), requires_grad=False)
        self.register_buffer('shift', shift.to(conv.weight.dtype), persistent=False)
        self.register_buffer('orig_weight', conv.weight.detach().clone(), persistent=False)
        pad = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
        # ring-only correction for the stride-1, symmetric-padding convs of IR units; a full map otherwise
        self.ring = pad[0] if (tuple(conv.stride) == (1, 1) and pad[0] == pad[1] and tuple(conv.dilation) == (1, 1)
                               and isinstance(conv.padding, tuple)) else 0
        self.input_hw = input_hw
        if input_hw is not None:
            self.register_buffer('correction', self._correction(input_hw), persistent=False)
        else:
            self.correction = None

    def _correction(self, hw: Tuple[int, int]) -> torch.Tensor:
        """conv(pad(shift * 1)) minus its interior value, (1, out, H', W'): zero except on the border ring."""
        conv, p = self.conv, self.ring
        k = conv.kernel_size
        small = (k[0] + 2 * p, k[1] + 2 * p)  # an input whose output, (4p+1)^2, has every distinct row and column
        if p and hw[0] >= small[0] and hw[1] >= small[1]:
            # With stride 1 an output row's value depends only on its distance to the nearer edge (rows within
            # p of an edge differ, the rest equal the centre), so index the small map out to the full size.
            full = self._shift_conv(small)
            out_h, out_w = hw[0] + 2 * p - k[0] + 1, hw[1] + 2 * p - k[1] + 1
            full = full[:, :, self._ring_index(out_h, p, full.device)][:, :, :, self._ring_index(out_w, p, full.device)]
        else:
            full = self._shift_conv(hw)
        return (full - conv.bias.double().view(1, -1, 1, 1)).to(self.shift.dtype)

    def _shift_conv(self, hw: Tuple[int, int]) -> torch.Tensor:
        ones = self.shift.double().view(1, -1, 1, 1).expand(1, -1, hw[0], hw[1])
        conv = self.conv
        return F.conv2d(ones, self.orig_weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def _ring_index(size: int, p: int, device: torch.device) -> torch.Tensor:
        """Rows (or columns) of the (4p+1)-sized small output to take for an output of `size`."""
        index = torch.full((size,), 2 * p, dtype=torch.long, device=device)
        index[:p] = torch.arange(p, device=device)
        index[size - p:] = torch.arange(3 * p + 1, 4 * p + 1, device=device)
        return index

    def uncorrected(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The convolution's output and the (1, out, H', W') correction still to add to it (None: already added)."""
        if self.correction is not None and (x.shape[-2], x.shape[-1]) == self.input_hw:
            corr = self.correction
            if x.shape[0] == 1 and isinstance(self.conv, PackedConv2d):
                # one image: the whole correction map is added inside the conv (oneDNN's add does not broadcast
                # over a batch efficiently, hence the ring slices below for larger batches)
                return self.conv(x, add=corr), None
        else:
            corr = self._correction((x.shape[-2], x.shape[-1])).to(x.device)
        return self.conv(x), corr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, corr = self.uncorrected(x)
        if corr is None:
            return y
        p = self.ring
        if p == 0 or y.shape[-2] <= 2 * p or y.shape[-1] <= 2 * p:
            return y + corr.to(y.dtype)
        y[:, :, :p] += corr[:, :, :p].to(y.dtype)
        y[:, :, -p:] += corr[:, :, -p:].to(y.dtype)
        y[:, :, p:-p, :p] += corr[:, :, p:-p, :p].to(y.dtype)
        y[:, :, p:-p, -p:] += corr[:, :, p:-p, -p:].to(y.dtype)
        return y


class FoldedBottleneckIR(nn.Module):
    """An IR unit with its BatchNorms folded: BnConv -> PReLU -> conv(+bias), plus a folded or strided shortcut."""

    def __init__(self, unit: BottleneckIR, input_hw: Optional[Tuple[int, int]]):
        super().__init__()
        bn0, conv1, prelu, conv2, bn2 = unit.residual
        self.residual = nn.Sequential(BnConv(bn0, conv1, input_hw), copy.deepcopy(prelu), _conv_then_bn(conv2, bn2))
        if isinstance(unit.shortcut, nn.Identity):
            self.shortcut = nn.Identity()
        elif isinstance(unit.shortcut, nn.MaxPool2d):
            stride = unit.shortcut.stride
            self.shortcut = StridedIdentity(stride[0] if isinstance(stride, tuple) else stride)
        else:
            self.shortcut = _conv_then_bn(unit.shortcut[0], unit.shortcut[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnconv, prelu, conv2 = self.residual
        if isinstance(prelu, NativePReLU):  # border correction and PReLU in one in-place pass
            y, corr = bnconv.uncorrected(x)
            y = prelu(y, add=corr)
        else:
            y = prelu(bnconv(x))
        if isinstance(conv2, PackedConv2d):  # the residual add runs inside the second convolution
            return conv2(y, add=self.shortcut(x))
        return conv2(y) + self.shortcut(x)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    """Fold every Conv2d directly followed by a BatchNorm2d in a Sequential (e.g. the IR-50 stem)."""
    mods = list(seq)
    out, i = [], 0
    while i < len(mods):
        if (i + 1 < len(mods) and isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d)
                and mods[i + 1].track_running_stats):
            out.append(_conv_then_bn(mods[i], mods[i + 1]))
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return nn.Sequential(*out)


def _default_example(model: nn.Module) -> Optional[torch.Tensor]:
    """One zero image of the model's `pretrained_cfg['input_size']`, on its device; None without one."""
    input_size = getattr(model, 'pretrained_cfg', {}).get('input_size')
    if input_size is None:
        return None
    return torch.zeros((1, *input_size), device=next(model.parameters()).device)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: Optional[torch.Tensor] = None) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorm folded into its convolutions, for inference.

    Folded: every IR unit (leading BN into the first conv exactly, border included, see `BnConv`; trailing BN
    into the second conv; projection-shortcut BN into its 1x1 conv), every Conv2d -> BatchNorm2d pair inside
    an nn.Sequential (the IR-50 stem). IR-50's `MaxPool2d(1, stride)` shortcuts become strided views. Other
    layers are untouched, so any model can be passed (timm models without such pairs come back unchanged;
    inductor freezing folds their conv-BN pairs when compiled).

    Args:
        model: the model (not modified).
        example: an input of the size the model will see; used to precompute the border maps of `BnConv`.
            Defaults to a single image of `model.pretrained_cfg['input_size']` when the model has one.
    """
    model = copy.deepcopy(model).eval()
    if example is None:
        example = _default_example(model)
    unit_hw: Dict[int, Tuple[int, int]] = {}
    if example is not None:
        hooks = [m.register_forward_pre_hook(lambda mod, args: unit_hw.__setitem__(id(mod), tuple(args[0].shape[-2:])))
                 for m in model.modules() if isinstance(m, BottleneckIR)]
        try:
            model(example[:1].float())
        finally:
            for h in hooks:
                h.remove()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, BottleneckIR):
                setattr(parent, name, FoldedBottleneckIR(child, unit_hw.get(id(child))))
            elif isinstance(child, nn.Sequential):
                replace(child)
                setattr(parent, name, _fold_sequential(child))
            else:
                replace(child)

    replace(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# oneDNN prepacked weights (CPU)


def _pair(v) -> List[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class PackedConv2d(nn.Module):
    """An inference `nn.Conv2d` run by oneDNN with its weight reordered once into oneDNN's blocked layout.

    Eager `F.conv2d` reorders the weight on every call; at batch 1 that costs more than the arithmetic (a
    256-channel 3x3 convolution on 14x14, bf16: 0.37 ms eager, 0.10 ms packed on this project's CPU). Two fusions
    run inside the same oneDNN call: `unary` ('gelu' exact, 'relu') after the convolution, and `add`, a tensor of
    the output's shape added at the end (a residual). The packed weight suits any batch size; `input_size` only
    guides oneDNN's choice of layout. The output is channels-last. Inputs are cast to the weight's dtype (oneDNN
    ops are outside autocast).
    """

    def __init__(self, conv: nn.Conv2d, input_size: Sequence[int], unary: str = 'none'):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
            raise ValueError('PackedConv2d needs numeric zero padding.')
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation, self.groups = tuple(_pair(conv.padding)), tuple(conv.dilation), conv.groups
        self.out_channels = conv.out_channels
        self.unary = unary
        self.dtype = conv.weight.dtype
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach().contiguous(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups, [int(d) for d in input_size])
        self.bias = None if conv.bias is None else conv.bias.detach().clone()
        self._algorithm = 'none' if unary == 'gelu' else ''
        self._args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, *self._args, self.unary, [], self._algorithm)
        if self.unary != 'none':
            raise ValueError('PackedConv2d fuses either an activation or an add, not both.')
        if add.dtype != self.dtype or not add.is_contiguous(memory_format=torch.channels_last):
            add = add.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, self.weight, self.bias, *self._args, 'add', None, None, [], None)


class PackedLinear(nn.Module):
    """An inference `nn.Linear` run by oneDNN with its weight packed once (see `PackedConv2d`); any leading dims."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), int(rows))
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if add is None or add.dtype != self.dtype or not add.is_contiguous():
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, 'none', [], '')
            return y if add is None else y + add
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.weight, self.bias, 'add')


class NativePReLU(nn.Module):
    """An inference `nn.PReLU` run in place on its input by `aucvt_zoo.native.prelu_` (3x PyTorch's bf16 PReLU).

    Only for an input nothing else reads: `pack_weights` puts it after a convolution whose output goes nowhere
    else. `forward(y, add)` computes PReLU(y + add), the form IR units need for `BnConv`'s border correction.
    """

    def __init__(self, prelu: nn.PReLU):
        super().__init__()
        self.register_buffer('slope', prelu.weight.detach().float().contiguous(), persistent=False)

    def forward(self, y: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        return native.prelu_(y, self.slope, add)


class Chunked(nn.Module):
    """Runs `module` on slices of at most `chunk` images and concatenates the results.

    The full-resolution start of IR-50 (stem and first stage, 64 x 112 x 112 maps) is bound by memory traffic
    (PReLU, the residual adds, the border corrections): a batch of 32 is 51 MB per map in bf16, a slice of 8 is
    13 MB and stays in the CPU's caches between one pass and the next. Measured here, stem + stage 1 of
    `aucvt_openface` at batch 32: 57 ms whole, 48 ms in slices of 8; later stages gain nothing (their maps are
    small and their convolutions like large batches).
    """

    def __init__(self, module: nn.Module, chunk: int):
        super().__init__()
        self.module, self.chunk = module, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.chunk:
            return self.module(x)
        return torch.cat([self.module(part) for part in x.split(self.chunk)])


class PackedBlock(nn.Module):
    """A CVT transformer `Block` whose two residual adds run inside its output linears (inference only)."""

    def __init__(self, block: Block):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn.proj(self.attn.attend(self.norm1(x)), add=x)
        return self.mlp.fc2(self.mlp.hidden(self.norm2(x)), add=x)


@torch.no_grad()
def pack_weights(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace, in place, every Conv2d and Linear of an inference model by its oneDNN-packed form.

    Fused on the way: the residual add of folded IR units (`fold_batchnorm`) into their second convolution, the
    GELU of the Conv-FFN into its depthwise convolution, and a transformer block's two residual adds into its
    output linears. A PReLU right after a packed convolution becomes a `NativePReLU` when `native.available()`
    (in IR units, together with the border correction of the `BnConv` before it). IR-50's stem and first stage
    run in slices of 8 images (see `Chunked`). Weights keep the dtype they have (cast them first for bf16). Call
    it last: packed weights are opaque oneDNN tensors that `.to()`, `deepcopy` and `state_dict` do not handle.

    Args:
        model: an eval-mode model on the CPU (not copied: prepare a copy first).
        example: an input batch; one image of it is run to learn every layer's input size.
    """
    if not pack_supported(example.device):
        raise ValueError('pack needs a CPU and a PyTorch built with oneDNN (torch.backends.mkldnn.is_available()).')
    sizes: Dict[int, Tuple[int, ...]] = {}

    def record(mod: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
        sizes.setdefault(id(mod), tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    low = weights[0].dtype if weights and weights[0].dtype != torch.float32 else None
    try:
        with torch.autocast('cpu', dtype=low or torch.bfloat16, enabled=low is not None):
            getattr(model, 'forward_with_aus', model)(example[:1])  # the AU branch too, where there is one
    finally:
        for h in hooks:
            h.remove()
    batch = example.shape[0]

    def conv_size(conv: nn.Conv2d) -> List[int]:
        return [batch, *sizes[id(conv)][1:]]

    def linear_rows(linear: nn.Linear) -> int:
        shape = sizes[id(linear)]
        return batch * (math.prod(shape[:-1]) // shape[0])

    for m in list(model.modules()):
        if (isinstance(m, ConvFfn) and isinstance(m.dwconv, nn.Conv2d) and id(m.dwconv) in sizes
                and type(m.act) is nn.GELU and m.act.approximate == 'none'):
            m.dwconv = PackedConv2d(m.dwconv, conv_size(m.dwconv), unary='gelu')
            m.act = nn.Identity()

    for m in model.modules():  # the border corrections are added in the conv's dtype and layout
        if isinstance(m, BnConv) and m.correction is not None:
            m.correction = m.correction.to(m.conv.weight.dtype).contiguous(memory_format=torch.channels_last)

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and id(child) in sizes and not isinstance(child.padding, str):
                setattr(parent, name, PackedConv2d(child, conv_size(child)))
            elif isinstance(child, nn.Linear) and id(child) in sizes:
                setattr(parent, name, PackedLinear(child, linear_rows(child)))
            else:
                replace(child)

    replace(model)

    def fuse_blocks(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if (isinstance(child, Block) and isinstance(child.attn.proj, PackedLinear)
                    and isinstance(child.mlp.fc2, PackedLinear)):
                setattr(parent, name, PackedBlock(child))  # eval: drop-path and dropout are identities
            else:
                fuse_blocks(child)

    fuse_blocks(model)
    if native.available():  # PReLUs whose input is a fresh convolution output nothing else reads
        for m in list(model.modules()):
            if (isinstance(m, FoldedBottleneckIR) and type(m.residual[1]) is nn.PReLU
                    and isinstance(m.residual[0].conv, PackedConv2d)):
                m.residual[1] = NativePReLU(m.residual[1])
            elif isinstance(m, nn.Sequential):
                for i in range(1, len(m)):
                    if type(m[i]) is nn.PReLU and isinstance(m[i - 1], PackedConv2d):
                        m[i] = NativePReLU(m[i])
    for m in list(model.modules()):
        if isinstance(m, IResNet) and len(m.stages) and not isinstance(m.stem, Chunked):
            m.stem = Chunked(nn.Sequential(m.stem, m.stages[0]), chunk=8)
            m.stages[0] = nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Prepared models


class _BothHeads(nn.Module):
    """forward(x) -> (expression logits, AU logits); AU logits are (B, 0) for models without an AU branch."""

    def __init__(self, model: nn.Module, channels_last: bool):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.has_aus = hasattr(model, 'forward_with_aus')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.has_aus:
            expr, aus = self.model.forward_with_aus(x)
        else:
            expr = self.model(x)
            aus = expr.new_zeros((expr.shape[0], 0))
        return expr, aus


class FastModel(nn.Module):
    """A model prepared for one `FastPath`: inference only, fp32 logits out.

    Attributes:
        path: the path it runs.
        model: the (copied, possibly folded) model it runs.
        compile_time_s: seconds the first (compiling) call took, minus an eager call; 0 when not compiled.
    """

    def __init__(self, model: nn.Module, path: FastPath, runner: Callable, device: torch.device):
        super().__init__()
        self.model = model
        self.path = path
        self._runner = runner
        self.device = device
        self.compile_time_s = 0.0
        self.au_names: Tuple[str, ...] = tuple(getattr(model, 'au_names', ()))
        # streams: the batch is split between `streams` threads, each with its share of the intra-op threads
        self._stream_threads = max(1, torch.get_num_threads() // path.streams)
        self._pool: Optional[ThreadPoolExecutor] = None

    def _autocast(self):
        if self.path.precision == 'fp32':
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_PRECISIONS[self.path.precision])

    def _run(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), self._autocast():  # both are thread-local: entered in the running thread
            expr, aus = self._runner(x.to(self.device))
        return expr.float(), aus.float()

    def _run_in_stream(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        torch.set_num_threads(self._stream_threads)  # OpenMP's thread count is per calling thread
        return self._run(x)

    def forward_with_aus(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Expression logits (B, classes) and AU logits (B, len(au_names)), fp32; (B, 0) AUs without a branch."""
        streams = self.path.streams
        if streams == 1 or x.shape[0] < 2:
            return self._run(x)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(streams, thread_name_prefix='aucvt-stream')
        outs = list(self._pool.map(self._run_in_stream, x.split(math.ceil(x.shape[0] / streams))))
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aus(x)[0]


def prepare(model: nn.Module, path: FastPath, example: Optional[torch.Tensor] = None) -> FastModel:
    """Prepare a copy of `model` for `path` (the original is not modified).

    Args:
        model: a zoo or timm model, on the device it should run on.
        path: the switches to apply.
        example: an input batch; required with `path.compile` (it runs the compile, whose time is recorded in
            `compile_time_s`), used by `fold` for the border maps, otherwise optional.
    """
    device = next(model.parameters()).device
    if path.precision == 'fp16' and device.type != 'cuda':
        raise ValueError('fp16 runs on CUDA only (CPU fp16 matmuls are emulated and slow); use bf16 on CPU.')
    if path.streams > 1 and device.type != 'cpu':
        raise ValueError(f'streams split a batch between CPU threads; the model is on {device}.')
    if path.pack and not pack_supported(device):
        raise ValueError(f'pack runs on a CPU with oneDNN only (model is on {device}); leave it out of the path.')
    if path.fold:
        prepared = fold_batchnorm(model, example)
    else:
        prepared = copy.deepcopy(model).eval()
        for p in prepared.parameters():
            p.requires_grad_(False)
    if path.precision != 'fp32':
        _cast_weights(prepared, _PRECISIONS[path.precision])
    if path.channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if path.pack:
        if example is None:
            example = _default_example(model)
            if example is None:
                raise ValueError('prepare(..., path with pack) needs an example batch (the model has no input_size).')
        x = example.to(device, torch.float32)
        pack_weights(prepared, x.contiguous(memory_format=torch.channels_last) if path.channels_last else x)
    both = _BothHeads(prepared, path.channels_last).eval()
    runner: Callable = both
    if path.compile:
        if example is None:
            raise ValueError('prepare(..., path with compile) needs an example batch to compile on.')
        # freezing turns weights into constants: the bf16 weight casts and conv-BN folding happen once
        runner = torch.compile(both, options={'freezing': True})
    fast = FastModel(prepared, path, runner, device)
    if path.compile:
        fast.compile_time_s = _compile_time(fast, both, example)
    return fast


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store conv, linear and PReLU weights in `dtype` once, so autocast does not re-cast them on every call.

    Norm layers keep fp32 parameters (autocast runs them in fp32); the outputs are what autocast would give.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.PReLU)):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        elif isinstance(m, BnConv) and m.correction is not None:
            m.correction = m.correction.to(dtype)  # it is added to the conv's output, which is in `dtype`


def _compile_time(fast: FastModel, eager: nn.Module, example: torch.Tensor) -> float:
    start = time.perf_counter()
    fast.forward_with_aus(example)
    first = time.perf_counter() - start
    with torch.inference_mode(), fast._autocast():
        start = time.perf_counter()
        eager(example.to(fast.device))
        eager_s = time.perf_counter() - start
    return max(first - eager_s, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Checking and choosing


@dataclasses.dataclass
class Agreement:
    """How a fast path's outputs compare with fp32 eager on one batch."""
    argmax_agreement: float
    max_abs_diff: float
    max_abs_diff_aus: float

    def accepted(self, min_agreement: float = ACCEPT_AGREEMENT, max_diff: float = ACCEPT_MAX_DIFF) -> bool:
        return self.argmax_agreement >= min_agreement and self.max_abs_diff <= max_diff


def _reference_outputs(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    model = model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        return _BothHeads(model, channels_last=False)(x.to(device).float())


def check_agreement(
        fast: FastModel,
        x: torch.Tensor,
        reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        model: Optional[nn.Module] = None,
) -> Agreement:
    """Compare `fast` with fp32 eager on `x` (give the fp32 outputs as `reference`, or the original `model`)."""
    if reference is None:
        if model is None:
            raise ValueError('check_agreement needs the fp32 reference outputs or the original model.')
        reference = _reference_outputs(model, x)
    ref_expr, ref_aus = reference
    expr, aus = fast.forward_with_aus(x)
    expr, aus = expr.to(ref_expr.device), aus.to(ref_aus.device)
    agree = (expr.argmax(1) == ref_expr.argmax(1)).float().mean().item()
    diff = (expr - ref_expr).abs().max().item()
    diff_aus = (aus - ref_aus).abs().max().item() if aus.numel() else 0.0
    return Agreement(agree, diff, diff_aus)


@dataclasses.dataclass
class CandidateReport:
    """One candidate path as `choose_fast_path` measured it."""
    path: FastPath
    images_per_s: float
    agreement: Optional[Agreement]
    accepted: bool
    compile_time_s: float = 0.0
    error: str = ''


@dataclasses.dataclass
class FastChoice:
    """What `choose_fast_path` picked: `model` runs `path`; `candidates` says what else was tried and how it did."""
    model: FastModel
    path: FastPath
    candidates: List[CandidateReport]
    malloc_tuned: bool = False

    def summary(self) -> str:
        """One line per candidate: name, img/s, argmax agreement, max |logit diff|, accepted, the pick marked."""
        lines = [f'glibc malloc tuned (tune_glibc_malloc): {"yes" if self.malloc_tuned else "no"}']
        if any(c.path.pack for c in self.candidates):
            lines.append('native PReLU kernel (pack): '
                         + ('yes' if native.available() else f'no, {native.unavailable_reason()}'))
        for c in self.candidates:
            mark = '*' if c.path == self.path else ' '
            if c.error:
                lines.append(f'{mark} {c.path.name:<40} failed: {c.error}')
                continue
            a = c.agreement
            lines.append(
                f'{mark} {c.path.name:<40} {c.images_per_s:8.1f} img/s  agreement {a.argmax_agreement:.4f}  '
                f'max|diff| {a.max_abs_diff:.5f}  {"ok" if c.accepted else "rejected"}'
                + (f'  compile {c.compile_time_s:.0f}s' if c.path.compile else ''))
        return '\n'.join(lines)


def candidate_paths(
        device: torch.device,
        precision: Optional[str] = None,
        allow_compile: bool = False,
) -> List[FastPath]:
    """Paths `choose_fast_path` tries on `device`, fp32 eager first.

    Args:
        device: where the model runs.
        precision: None for every precision the device runs natively, or one of 'fp32', 'bf16', 'fp16' only.
        allow_compile: add `torch.compile` variants (compiling takes minutes on a small CPU, so off by default).
    """
    device = torch.device(device)
    if precision is None:
        precisions = ['fp32']
        if bf16_supported(device):
            precisions.append('bf16')
        if device.type == 'cuda':
            precisions.append('fp16')
    else:
        if precision not in _PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(_PRECISIONS)} or None, not {precision!r}.')
        precisions = [precision]
    paths = []
    for prec in precisions:
        paths += [FastPath(prec), FastPath(prec, channels_last=True, fold=True)]
        if pack_supported(device):
            paths.append(FastPath(prec, channels_last=True, fold=True, pack=True))
            if torch.get_num_threads() >= 2:
                paths.append(FastPath(prec, channels_last=True, fold=True, pack=True, streams=2))
        if allow_compile:
            paths.append(FastPath(prec, channels_last=True, fold=True, compile=True))
    return paths


def _images_per_s(fast: FastModel, x: torch.Tensor, runs: int, warmup: bool = True) -> float:
    if warmup:
        fast.forward_with_aus(x)
    times = []
    for _ in range(runs):
        if fast.device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fast.forward_with_aus(x)
        if fast.device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return x.shape[0] / sorted(times)[len(times) // 2]


def choose_fast_path(
        model: nn.Module,
        check_batch: torch.Tensor,
        precision: Optional[str] = None,
        allow_compile: bool = False,
        candidates: Optional[Sequence[FastPath]] = None,
        timing_runs: int = 3,
        min_agreement: float = ACCEPT_AGREEMENT,
        max_diff: float = ACCEPT_MAX_DIFF,
        tune_malloc: bool = True,
) -> FastChoice:
    """The fastest path that keeps expression predictions within the acceptance rule of fp32 eager.

    Every candidate is prepared, compared with fp32 eager on `check_batch`, and timed on it (median of
    `timing_runs`); the fastest accepted one is returned. fp32 eager is always a candidate and always accepted,
    so there is always an answer. A candidate that fails to prepare or run is reported and skipped.

    Args:
        model: the model, on its device, with its weights (the check is only as good as the weights).
        check_batch: (N, C, H, W) normalised inputs, ideally real faces; 16-64 is enough to time, but the
            agreement rule is only meaningful with N >= 200 (one flip in fewer than 200 fails 99.5%).
        precision: 'fp32' forces exact paths (`--precision fp32`); 'bf16'/'fp16' forces that precision; None
            lets the device decide.
        allow_compile: also try `torch.compile`d paths (minutes of compiling on a small CPU).
        candidates: paths to try instead of `candidate_paths(device, precision, allow_compile)`.
        timing_runs: timed runs per accepted candidate (a rejected one is timed once, for the report).
        min_agreement: minimum expression argmax agreement with fp32 eager.
        max_diff: maximum |expression logit difference| with fp32 eager.
        tune_malloc: apply `tune_glibc_malloc` first (on CPU it is worth up to 10x on this project's
            2-core VM, see docs/performance.md; the process then keeps its peak memory). Exactness is unaffected.
    """
    device = next(model.parameters()).device
    malloc_tuned = tune_glibc_malloc() if tune_malloc and device.type == 'cpu' else False
    paths = list(candidates) if candidates is not None else candidate_paths(device, precision, allow_compile)
    if FastPath() not in paths:
        paths.insert(0, FastPath())
    reference = _reference_outputs(model, check_batch)
    reports: List[CandidateReport] = []
    best: Optional[Tuple[float, FastModel]] = None
    for path in paths:
        try:
            fast = prepare(model, path, example=check_batch)
            agreement = check_agreement(fast, check_batch, reference)
            accepted = path == FastPath() or agreement.accepted(min_agreement, max_diff)
            # the agreement check was the warm-up; a rejected path is timed once, for the report only
            speed = _images_per_s(fast, check_batch, timing_runs if accepted else 1, warmup=False)
        except Exception as err:  # a path this build/device cannot run is skipped, and said so
            reports.append(CandidateReport(path, 0.0, None, False, error=f'{type(err).__name__}: {err}'))
            continue
        reports.append(CandidateReport(path, speed, agreement, accepted, fast.compile_time_s))
        if accepted and (best is None or speed > best[0]):
            best = (speed, fast)
    assert best is not None, 'fp32 eager failed to run: ' + reports[0].error
    return FastChoice(best[1], best[1].path, reports, malloc_tuned or _glibc_tuned)


# ---------------------------------------------------------------------------------------------------------------
# Memory allocator

# Where Debian/Ubuntu (libjemalloc2, libtcmalloc-minimal4), conda and Homebrew put the two allocators.
_ALLOCATOR_LIBS = {
    'jemalloc': ('libjemalloc.so.2', 'libjemalloc.so'),
    'tcmalloc': ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4', 'libtcmalloc_minimal.so', 'libtcmalloc.so'),
}
_LIB_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib', '/usr/local/lib',
             '/lib/x86_64-linux-gnu', '/lib/aarch64-linux-gnu')


def find_allocator(name: str) -> Optional[str]:
    """Path of the jemalloc or tcmalloc shared library on this machine, or None."""
    if name not in _ALLOCATOR_LIBS:
        raise ValueError(f'allocator must be one of {sorted(_ALLOCATOR_LIBS)}, not {name!r}.')
    dirs = [os.path.join(sys.prefix, 'lib'), *_LIB_DIRS]
    for d in dirs:
        for lib in _ALLOCATOR_LIBS[name]:
            candidate = os.path.join(d, lib)
            if os.path.exists(candidate):
                return candidate
    return None


def allocator_env(name: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """An environment for a child process that runs with `name` ('jemalloc', 'tcmalloc' or 'glibc') as malloc.

    An allocator can only be swapped before a process starts (LD_PRELOAD), so a program applies it by starting
    its worker (or re-executing itself) with this environment. For glibc, LD_PRELOAD entries of the other two
    are removed. Raises a ValueError naming the package to install when the library is not found.
    """
    env = dict(os.environ if base is None else base)
    kept = [p for p in env.get('LD_PRELOAD', '').split(':') if p and 'jemalloc' not in p and 'tcmalloc' not in p]
    if name != 'glibc':
        lib = find_allocator(name)
        if lib is None:
            package = 'libjemalloc2' if name == 'jemalloc' else 'libtcmalloc-minimal4'
            raise ValueError(
                f'{name} not found in {", ".join(_LIB_DIRS)}; install it (Debian/Ubuntu: apt-get install {package}; '
                f'conda: conda install {name if name == "jemalloc" else "gperftools"}) or use --allocator glibc.')
        kept.insert(0, lib)
    if kept:
        env['LD_PRELOAD'] = ':'.join(kept)
    else:
        env.pop('LD_PRELOAD', None)
    return env


# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_glibc_tuned = False


def tune_glibc_malloc(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Stop glibc malloc from returning activation buffers to the kernel after every forward pass.

    glibc serves allocations above its mmap threshold (which cannot be raised past 32 MiB) with fresh mmaps and
    unmaps them on free, so every large activation is page-faulted in again on the next pass (hundreds of
    thousands of faults per batch of 32 for AU-CVT). With mmap disabled (M_MMAP_MAX = 0) and a high trim
    threshold, freed memory stays in the heap and is reused. Unlike LD_PRELOAD of jemalloc/tcmalloc this works
    in a running process, for allocations made after the call. The cost: the process keeps its peak memory.

    Returns True when applied; False where malloc is not glibc's or another allocator is preloaded.
    """
    global _glibc_tuned
    if any(name in os.environ.get('LD_PRELOAD', '') for name in _ALLOCATOR_LIBS):
        return False
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    _glibc_tuned = _glibc_tuned or ok
    return ok
