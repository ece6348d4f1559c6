"""IR-50: the improved-residual ResNet-50 of face.evoLVe, trained for face recognition on MS-Celeb-1M.

The CNN embedding of AU-CVT (arXiv:2207.09777, section 3.2) and the starting point of most FER papers.
Architecture as in face.evoLVe (github ZhaoJ9014/face.evoLVe, MIT licence), itself after ArcFace
(arXiv:1801.07698): a 3x3 stride-1 stem and `bottleneck_IR` units (BN, conv3x3, PReLU, conv3x3 with stride, BN)
whose shortcut is a stride-s 1x1 max pool where the width does not change. Stages of 3/4/14/3 units give
64x56x56, 128x28x28, 256x14x14 and 512x7x7 maps for a 112x112 face.

The face-recognition embedding head (`output_layer`) is not part of this model: the classifier is global
average pooling plus a linear layer, and `features_only=True` returns the four stage maps.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import register_model
from timm.models._manipulate import checkpoint_seq

from ..hub import build_model, zoo_cfg, zoo_default_cfgs

__all__ = ['IResNet', 'BottleneckIR', 'remap_evolve_state_dict']

# face.evoLVe module prefixes -> ours; `output_layer` (the 512-d face embedding head) has no counterpart
_EVOLVE_STEM = 'input_layer.'
_EVOLVE_UNIT = 'body.'
_EVOLVE_DROPPED = ('output_layer.',)


class BottleneckIR(nn.Module):
    """face.evoLVe `bottleneck_IR` unit: BN-conv-PReLU-conv(stride)-BN, plus an identity-or-projection shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if in_chs == out_chs and stride == 1:
            # face.evoLVe's MaxPool2d(1, 1) is the identity; nn.Identity spares a copy of the map in every unit
            self.shortcut = nn.Identity()
        elif in_chs == out_chs:
            # a 1x1 max pool with stride s is a strided identity: it keeps every s-th pixel
            self.shortcut = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_chs),
            nn.Conv2d(in_chs, out_chs, 3, stride=1, padding=1, bias=False),
            nn.PReLU(out_chs),
            nn.Conv2d(out_chs, out_chs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IResNet(nn.Module):
    """IR-ResNet backbone (IR-50 with the default arguments) with a pooled linear classifier.

    Args:
        layers: units per stage; the first unit of every stage has stride 2.
        channels: width of every stage.
        num_classes: classifier outputs, 0 for none.
        in_chans: input image channels.
        global_pool: 'avg' (default), any timm pooling type, or '' for no pooling.
        drop_rate: dropout before the classifier.
        device: where to create the parameters.
        dtype: parameter dtype.
    """

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 14, 3),
            channels: Sequence[int] = (64, 128, 256, 512),
            num_classes: int = 6,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if len(layers) != len(channels) or not layers:
            raise ValueError(
                f'layers {tuple(layers)} and channels {tuple(channels)} must be non-empty and of equal length.')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem_chs = channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_chs),
            nn.PReLU(stem_chs),
        )
        stages = []
        self.feature_info = []
        in_chs, reduction = stem_chs, 1
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            units = [BottleneckIR(in_chs if u == 0 else out_chs, out_chs, 2 if u == 0 else 1) for u in range(depth)]
            stages.append(nn.Sequential(*units))
            in_chs, reduction = out_chs, reduction * 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def remap_evolve_state_dict(
        state_dict: Dict[str, torch.Tensor],
        layers: Sequence[int],
        prefix: str = '',
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename face.evoLVe IR keys (`input_layer.*`, `body.N.res_layer.*`, `body.N.shortcut_layer.*`) to ours.

    Args:
        state_dict: tensors keyed the face.evoLVe way (any other keys pass through unchanged).
        layers: units per stage of the target model; units beyond them are dropped (e.g. 21 units for CVT).
        prefix: prefix of the target module (`'trunk.'` for the CVT embedding).

    Returns:
        The renamed state dict and the source keys that were dropped.
    """
    unit_to_stage = [(s, u) for s, depth in enumerate(layers) for u in range(depth)]
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(_EVOLVE_STEM):
            out[prefix + 'stem.' + key[len(_EVOLVE_STEM):]] = value
        elif key.startswith(_EVOLVE_UNIT):
            index, rest = key[len(_EVOLVE_UNIT):].split('.', 1)
            if int(index) >= len(unit_to_stage):
                dropped.append(key)
                continue
            stage, unit = unit_to_stage[int(index)]
            rest = rest.replace('res_layer.', 'residual.', 1).replace('shortcut_layer.', 'shortcut.', 1)
            out[f'{prefix}stages.{stage}.{unit}.{rest}'] = value
        elif key.startswith(_EVOLVE_DROPPED):
            dropped.append(key)
        else:
            out[key] = value
    return out, dropped


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: IResNet) -> Dict[str, torch.Tensor]:
    """Map an original face.evoLVe checkpoint onto `IResNet`, and complete a head-less backbone release.

    face.evoLVe names (`input_layer.*`, `body.N.*`) are renamed; its `output_layer.*` embedding head and units
    beyond the model's depth are dropped (the converter reports them). Weights without an expression classifier
    (the MS-Celeb releases) get the model's own freshly initialised classifier, as timm does for a new
    `num_classes`.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    if any(k.startswith((_EVOLVE_STEM, _EVOLVE_UNIT)) for k in state_dict):
        state_dict, _ = remap_evolve_state_dict(state_dict, [len(s) for s in model.stages])
    fc = model.get_classifier()
    if isinstance(fc, nn.Linear) and 'head.fc.weight' not in state_dict:
        state_dict = dict(state_dict)
        state_dict['head.fc.weight'] = fc.weight.detach().clone()
        state_dict['head.fc.bias'] = fc.bias.detach().clone()
    return state_dict


def _create_iresnet(variant: str, pretrained: bool = False, **kwargs) -> IResNet:
    return build_model(
        IResNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return zoo_cfg(first_conv='stem.0', classifier='head.fc', pool_size=(7, 7), fixed_input_size=False, **kwargs)


default_cfgs = zoo_default_cfgs({
    'ir50.ms1m': _cfg(
        description='face.evoLVe IR-50 trained for face recognition on MS-Celeb-1M; the expression head is new.',
        origin_url='https://github.com/ZhaoJ9014/face.evoLVe',
        license='other',  # the code is MIT; the MS-Celeb-1M weights carry the dataset's research-only terms
        paper_ids=('arXiv:1801.07698', 'arXiv:2207.09777'),
    ),
    'ir50_tiny.facs': _cfg(description='Narrow, shallow IR-ResNet for tests and CPU demos.'),
})


@register_model
def ir50(pretrained: bool = False, **kwargs) -> IResNet:
    """IR-50 (face.evoLVe), MS-Celeb-1M face-recognition weights."""
    model_args = dict(layers=(3, 4, 14, 3), channels=(64, 128, 256, 512))
    return _create_iresnet('ir50', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ir50_tiny(pretrained: bool = False, **kwargs) -> IResNet:
    """IR-ResNet with 1/4 of IR-50's widths and 1/1/2/1 units: the same code, for tests and demos."""
    model_args = dict(layers=(1, 1, 2, 1), channels=(16, 32, 64, 128))
    return _create_iresnet('ir50_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
