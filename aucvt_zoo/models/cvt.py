"""CVT and AU-CVT: convolutional vision transformers on an IR-50 embedding, with an AU-supervised branch.

Paper: "AU-Supervised Convolutional Vision Transformers for Synthetic Facial Expression Recognition",
Liu et al., ABAW4 2022, arXiv:2207.09777 (sections 3.1-3.4). Released code: github msy1412/ABAW4.

The paper's model (the registered `cvt_ir50`, `aucvt_raf`, `aucvt_openface`): IR-50 stages 1-3 give a
256x14x14 map; 1x1 tokens of width 256 without a class token; transformer blocks of multi-head self-attention
and a Conv-FFN (linear, depthwise 3x3 on the token lattice, GELU, linear); 2x2 patch merging to 7x7x512;
flatten + dropout + linear to the 6 expressions. The AU branch reads the tokens after the first stage.

The authors' released code differs (3x3 conv embedding to width 512 + learnable position embedding, no
merging, plain MLP, average pool + LayerNorm head, an upper/lower AU layout); it is a configuration of the same
classes (`*_released` models), so its checkpoints convert and load.

Token maps are kept channels-last, (B, H, W, C), so the lattice is explicit for the Conv-FFN, merging and the
AU regions.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model
from timm.models._manipulate import checkpoint_seq

from ..hub import build_model, zoo_cfg, zoo_default_cfgs
from ..labels import resolve_aus
from .au_branch import AuBranch
from .ir50 import IResNet, checkpoint_filter_fn as ir_checkpoint_filter_fn

__all__ = ['CVT', 'Attention', 'ConvFfn', 'Block', 'PatchMerging', 'CvtStage']


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token map, through `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'width {dim} is not divisible by {num_heads} heads.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs, concatenated, before the output projection: (B, H, W, C)."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return x.transpose(1, 2).reshape(B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(x)))


class ConvFfn(nn.Module):
    """Feed-forward of the paper: linear C -> rC, depthwise 3x3 on the token lattice, GELU, linear rC -> C.

    With `conv=False` it is the plain MLP of the released code (linear, GELU, linear).
    """

    def __init__(self, dim: int, hidden_dim: int, conv: bool = True, drop: float = 0.):
        super().__init__()
        self.use_conv = conv
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim) if conv else nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden features, (B, H, W, rC), that `fc2` projects back."""
        x = self.fc1(x)
        if self.use_conv:
            # each token sees its 8 neighbours on the lattice
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.act(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.hidden(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)); x + FFN(LN(x))."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            conv_ffn: bool = True,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvFfn(dim, int(dim * mlp_ratio), conv=conv_ffn, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, linear 4C -> out_dim: halves the lattice."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        torch._assert(H % 2 == 0, 'patch merging needs an even token lattice height')
        torch._assert(W % 2 == 0, 'patch merging needs an even token lattice width')
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class CvtStage(nn.Module):
    """Optional downsampling (patch merging) followed by transformer blocks."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            downsample: bool,
            drop_path: Sequence[float],
            **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = PatchMerging(in_dim, dim, norm_eps=block_kwargs.get('norm_eps', 1e-6))
        elif in_dim != dim:
            raise ValueError(f'A stage without patch merging keeps the width; got {in_dim} -> {dim}.')
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NoAuBranch(nn.Module):
    """Stands in for the AU branch of a model without one: zero AU logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 0))


class CVT(nn.Module):
    """Convolutional Vision Transformer on an IR-ResNet embedding, with an optional AU branch (AU-CVT).

    `model(x)` returns expression logits (B, num_classes); `model.forward_with_aus(x)` returns the expression and
    the AU logits (B, len(model.au_names)) of one forward pass.

    Args:
        trunk_layers: IR units per embedding stage (IR-50's first three: 3, 4, 14).
        trunk_channels: IR stage widths.
        embed_dims: transformer width per stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: FFN hidden width / width.
        embed_kernel: kernel of the token embedding conv (1 = the paper's 1x1 patches, 3 = released code).
        pos_embed: add a learnable position embedding to the tokens (released code).
        conv_ffn: depthwise 3x3 conv in the FFN (paper) or a plain MLP (released code).
        patch_merging: 2x2 patch merging between stages (paper) or none (released code, equal widths).
        global_pool: 'flatten' (paper), 'avg' (released code: average pool + LayerNorm), '' for none.
        au_labels: AU label set name or AU list for the AU branch; None for no AU branch.
        au_layout: 'paper7' (7 regions) or 'released2' (upper/lower).
        au_stage: the transformer stage whose output the AU branch reads.
        num_classes: expression classes.
        in_chans: input image channels.
        img_size: input size; fixed, since the flatten head, position embedding and AU regions are laid out for it.
        qkv_bias: bias in the qkv projection.
        drop_rate: dropout before the classifier and in the FFN/projections.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        norm_eps: LayerNorm epsilon.
        device: where to create the parameters.
        dtype: parameter dtype.
    """

    def __init__(
            self,
            trunk_layers: Sequence[int] = (3, 4, 14),
            trunk_channels: Sequence[int] = (64, 128, 256),
            embed_dims: Sequence[int] = (256, 512),
            depths: Sequence[int] = (4, 2),
            num_heads: Sequence[int] = (8, 16),
            mlp_ratio: float = 4.,
            embed_kernel: int = 1,
            pos_embed: bool = False,
            conv_ffn: bool = True,
            patch_merging: bool = True,
            global_pool: str = 'flatten',
            au_labels: Optional[Union[str, Sequence[Union[str, int]]]] = None,
            au_layout: str = 'paper7',
            au_stage: int = 0,
            num_classes: int = 6,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 112,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-6,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads)):
            raise ValueError(f'embed_dims {embed_dims}, depths {depths} and num_heads {num_heads} differ in length.')
        if global_pool not in ('flatten', 'avg', ''):
            raise ValueError(f"global_pool must be 'flatten', 'avg' or '', not {global_pool!r}.")
        if not 0 <= au_stage < len(depths):
            raise ValueError(f'au_stage {au_stage} is not a stage of this model (0..{len(depths) - 1}).')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.au_stage = au_stage
        self.au_names = resolve_aus(au_labels)

        self.trunk = IResNet(trunk_layers, trunk_channels, num_classes=0, in_chans=in_chans, global_pool='')
        stride = 2 ** len(trunk_layers)
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ValueError(f'img_size {self.img_size} must be a multiple of the embedding stride {stride}.')
        grid = (self.img_size[0] // stride, self.img_size[1] // stride)
        self.patch_embed = nn.Conv2d(trunk_channels[-1], embed_dims[0], embed_kernel, padding=embed_kernel // 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], embed_dims[0])) if pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)

        # stochastic depth rising linearly over the blocks (plain floats: works under `with torch.device('meta')`)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        block_kwargs = dict(
            mlp_ratio=mlp_ratio, conv_ffn=conv_ffn, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
            norm_eps=norm_eps)
        stages, grids = [], []
        in_dim, stage_grid, first = embed_dims[0], grid, 0
        self.feature_info = [
            dict(num_chs=c, reduction=2 ** (i + 1), module=f'trunk.stages.{i}') for i, c in enumerate(trunk_channels)]
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            downsample = patch_merging and i > 0
            if downsample:
                stage_grid = (stage_grid[0] // 2, stage_grid[1] // 2)
            stages.append(CvtStage(
                in_dim, dim, depth, heads, downsample, drop_path=dpr[first:first + depth], **block_kwargs))
            grids.append(stage_grid)
            self.feature_info.append(
                dict(num_chs=dim, reduction=self.img_size[0] // stage_grid[0], module=f'stages.{i}'))
            in_dim, first = dim, first + depth
        self.stages = nn.Sequential(*stages)
        self.grid = grids[-1]
        self.num_features = embed_dims[-1]
        # the paper's flatten head normalises every token; the released head normalises the pooled vector
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps) if global_pool != 'avg' else nn.Identity()
        self.fc_norm = nn.LayerNorm(self.num_features, eps=norm_eps) if global_pool == 'avg' else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head_hidden_size = self._pooled_size(global_pool)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        if self.au_names:
            self.au_head = AuBranch(
                embed_dims[au_stage], self.au_names, layout=au_layout, grid=grids[au_stage], norm_eps=norm_eps)
        else:
            self.au_head = NoAuBranch()
        self._size_error = (
            f'This model expects {self.img_size[0]}x{self.img_size[1]} input (aligned faces; its flatten head, '
            f'position embedding and AU regions are laid out for a {grid[0]}x{grid[1]} token map). Resize or '
            f'align faces to {self.img_size[0]}x{self.img_size[1]} first, e.g. with '
            f'timm.data.create_transform(**timm.data.resolve_data_config(model=model)).')
        self.init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _pooled_size(self, global_pool: str) -> int:
        if global_pool == 'flatten':
            return self.grid[0] * self.grid[1] * self.num_features
        return self.num_features

    def init_weights(self) -> None:
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith('trunk'):
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^trunk|^patch_embed|^pos_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm|^au_head', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('flatten', 'avg', ''):
                raise ValueError(f"global_pool must be 'flatten', 'avg' or '', not {global_pool!r}.")
            self.global_pool = global_pool
            self.head_hidden_size = self._pooled_size(global_pool)
        self.num_classes = num_classes
        device = self.patch_embed.weight.device
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Final token map after the norm, and the token map the AU branch reads."""
        torch._assert(x.shape[-2] == self.img_size[0], self._size_error)
        torch._assert(x.shape[-1] == self.img_size[1], self._size_error)
        x = self.trunk.forward_features(x)
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        tap = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == self.au_stage:
                tap = x
        return self.norm(x), tap

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token map (B, H, W, C) after the last stage (and the per-token norm of the flatten head)."""
        return self._forward_tokens(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = self.fc_norm(x.mean(dim=(1, 2)))
        elif self.global_pool == 'flatten':
            x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @torch.jit.export
    def forward_with_aus(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Expression logits (B, num_classes) and AU logits (B, len(self.au_names)) from one forward pass.

        AU logits are in the order of `self.au_names`; apply a sigmoid for AU probabilities. A model without an
        AU branch returns (B, 0) AU logits.
        """
        features, tap = self._forward_tokens(x)
        return self.forward_head(features), self.au_head(tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_trunk_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load IR-50 weights (face.evoLVe or `ir50` names) into the CNN embedding, strictly.

        Units beyond the embedding's depth (face.evoLVe's body.21-23) and the face-embedding head are dropped.
        """
        state_dict = ir_checkpoint_filter_fn(state_dict, self.trunk)
        kept = {k: v for k, v in state_dict.items() if not k.startswith(('head.', 'stages.3.'))}
        self.trunk.load_state_dict(kept, strict=True)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CVT) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints ({'model': ...}, {'state_dict': ...}) and DataParallel `module.` prefixes."""
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _create_cvt(variant: str, pretrained: bool = False, **kwargs) -> CVT:
    if kwargs.get('features_only'):
        raise ValueError(
            f'{variant} does not support features_only=True: use model.forward_features(x) for the token map, '
            f'model.forward_with_aus(x) for expression and AU logits, or timm.create_model("ir50", '
            f'features_only=True) for the CNN stage maps.')
    return build_model(CVT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    defaults = dict(first_conv='trunk.stem.0', classifier='head', pool_size=(7, 7), fixed_input_size=True)
    return zoo_cfg(**dict(defaults, **kwargs))


_LSD = 'Fine-tuned on ABAW4 LSD (synthetic Aff-Wild2 expressions); IR-50 from MS-Celeb-1M.'
# Weights trained on LSD / MS-Celeb-1M inherit those datasets' research-only terms (weights/manifest.json).
_RESEARCH_ONLY = 'other'
_FACS = 'Trained on the built-in procedural FACS faces: a demonstration, not a model of real expressions.'
default_cfgs = zoo_default_cfgs({
    'cvt_ir50.lsd': _cfg(license=_RESEARCH_ONLY, description='CVT (paper Table 1 row 3). ' + _LSD),
    'aucvt_raf.lsd': _cfg(
        license=_RESEARCH_ONLY, description='AU-CVT with RAF-AU supervision (paper Table 1 row 4). ' + _LSD),
    'aucvt_openface.lsd': _cfg(
        license=_RESEARCH_ONLY, description='AU-CVT with OpenFace pseudo-AUs (paper Table 1 row 5). ' + _LSD),
    'cvt_ir50_released.lsd': _cfg(
        pool_size=(14, 14), license=_RESEARCH_ONLY, description='CVT, authors\' released-code layout. ' + _LSD),
    'aucvt_raf_released.lsd': _cfg(
        pool_size=(14, 14), license=_RESEARCH_ONLY,
        description='AU-CVT RAF-AU, authors\' released-code layout (7 regions). ' + _LSD),
    'aucvt_openface_released.lsd': _cfg(
        pool_size=(14, 14), license=_RESEARCH_ONLY,
        description='AU-CVT OpenFace, authors\' released-code layout (2 regions). ' + _LSD),
    'cvt_ir50_tiny.facs': _cfg(description='Narrow CVT for tests and demos. ' + _FACS),
    'aucvt_raf_tiny.facs': _cfg(description='Narrow AU-CVT (rafau21) for tests and demos. ' + _FACS),
    # trained by the default run of the project's trainer, shipped inside the package: loads offline everywhere
    'aucvt_openface_tiny.facs': _cfg(
        file=str(Path(__file__).resolve().parents[1] / 'weights' / 'aucvt_openface_tiny.facs.safetensors'),
        description='Narrow AU-CVT (openface16) for tests and demos. ' + _FACS),
})

# The paper's model, and the authors' released-code layout of the same classes.
_PAPER = dict(embed_dims=(256, 512), depths=(4, 2), num_heads=(8, 16))
_RELEASED = dict(
    embed_dims=(512, 512), depths=(4, 2), num_heads=(16, 16), embed_kernel=3, pos_embed=True, conv_ffn=False,
    patch_merging=False, global_pool='avg')
_TINY = dict(
    trunk_layers=(1, 1, 2), trunk_channels=(16, 32, 64), embed_dims=(64, 128), depths=(1, 1), num_heads=(2, 4),
    mlp_ratio=2.)


def _entry(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> CVT:
    return _create_cvt(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cvt_ir50(pretrained: bool = False, **kwargs) -> CVT:
    """CVT: IR-50 embedding + multi-stage transformer, expression head (paper Table 1, CVT)."""
    return _entry('cvt_ir50', pretrained, _PAPER, kwargs)


@register_model
def aucvt_raf(pretrained: bool = False, **kwargs) -> CVT:
    """AU-CVT with a 7-region AU branch over RAF-AU's 21 AUs (paper Table 1, AU-CVT + RAF-AU)."""
    return _entry('aucvt_raf', pretrained, dict(_PAPER, au_labels='rafau21'), kwargs)


@register_model
def aucvt_openface(pretrained: bool = False, **kwargs) -> CVT:
    """AU-CVT with a 7-region AU branch over OpenFace's 16 AUs (paper Table 1, AU-CVT + LSD-OpenFace)."""
    return _entry('aucvt_openface', pretrained, dict(_PAPER, au_labels='openface16'), kwargs)


@register_model
def cvt_ir50_released(pretrained: bool = False, **kwargs) -> CVT:
    """CVT in the authors' released-code layout."""
    return _entry('cvt_ir50_released', pretrained, _RELEASED, kwargs)


@register_model
def aucvt_raf_released(pretrained: bool = False, **kwargs) -> CVT:
    """AU-CVT in the authors' released-code layout, 7 AU regions over rafau21."""
    return _entry('aucvt_raf_released', pretrained, dict(_RELEASED, au_labels='rafau21'), kwargs)


@register_model
def aucvt_openface_released(pretrained: bool = False, **kwargs) -> CVT:
    """AU-CVT in the authors' released-code layout, upper/lower AU regions over openface16."""
    return _entry(
        'aucvt_openface_released', pretrained, dict(_RELEASED, au_labels='openface16', au_layout='released2'), kwargs)


@register_model
def cvt_ir50_tiny(pretrained: bool = False, **kwargs) -> CVT:
    """Narrow CVT (same code) for tests and CPU demos."""
    return _entry('cvt_ir50_tiny', pretrained, _TINY, kwargs)


@register_model
def aucvt_raf_tiny(pretrained: bool = False, **kwargs) -> CVT:
    """Narrow AU-CVT over rafau21 (same code) for tests and CPU demos."""
    return _entry('aucvt_raf_tiny', pretrained, dict(_TINY, au_labels='rafau21'), kwargs)


@register_model
def aucvt_openface_tiny(pretrained: bool = False, **kwargs) -> CVT:
    """Narrow AU-CVT over openface16 (same code) for tests and CPU demos."""
    return _entry('aucvt_openface_tiny', pretrained, dict(_TINY, au_labels='openface16'), kwargs)
