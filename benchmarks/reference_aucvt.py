"""The authors' AU-CVT as their released code builds it: the baseline issue 6 measures the zoo against.

The released training code (github msy1412/ABAW4) is not in this repository and cannot be fetched here, so this
file rebuilds its model from the facts in `shared/reference/` (the checkpoint layout and the full state-dict key
listings): the same module names and shapes (tests/test_convert.py checks them against the listings, key by
key), the same forward pass as the layout describes it, written the way 2022 ViT code was (timm-0.4-style
attention with an explicit softmax, a plain MLP), and the modules it builds but never calls (`norm`, `pools`,
`pos_block`, and the 51M-parameter `output_layer`), because they are part of what a user of that code loads.

What the layout does not say, and is our assumption: the region features are `.squeeze()`d after pooling, which
is how such code breaks at batch size 1 (issue 6 reports the reference crashing there; `squeeze_pooled=False`
runs it anyway, to time batch 1).

    from reference_aucvt import ReferenceAuCvt
    ref = ReferenceAuCvt(regions=7).eval()
    ref.load_state_dict(checkpoint['model'])               # an authors' checkpoint, keys without 'module.'
    expression_logits, au_logits = ref.forward_with_aus(x)  # x: (B, 3, 112, 112), mean = std = 0.5
"""
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['ReferenceAuCvt', 'REGIONS_7', 'REGIONS_2']

# (rows, cols) half-open on the 14x14 map, and outputs per head, from the layout's tables
REGIONS_7: Dict[str, Tuple[Tuple[int, int, int, int], int]] = {
    'AU11': ((0, 7, 0, 7), 4), 'AU12': ((0, 7, 4, 10), 1), 'AU13': ((0, 7, 7, 14), 4), 'AU21': ((5, 12, 0, 6), 1),
    'AU22': ((4, 10, 4, 10), 1), 'AU23': ((5, 12, 8, 14), 1), 'AU3': ((6, 14, 0, 14), 14)}
REGIONS_2: Dict[str, Tuple[Tuple[int, int, int, int], int]] = {
    'up': ((0, 8, 0, 14), 7), 'low': ((6, 14, 0, 14), 9)}


class BottleneckIR(nn.Module):
    """face.evoLVe `bottleneck_IR`: BN, conv3x3, PReLU, conv3x3 (stride), BN; max-pool(1, s) or conv1x1+BN shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False), nn.BatchNorm2d(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    """IR-50 cut after its third stage, as the authors' `cnn`: 3 x 112 x 112 -> 256 x 14 x 14."""

    def __init__(self, layers: Sequence[int] = (3, 4, 14), channels: Sequence[int] = (64, 128, 256)):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, channels[0], (3, 3), 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0]))
        units, in_channel = [], channels[0]
        for n, depth in zip(layers, channels):
            for i in range(n):
                units.append(BottleneckIR(in_channel, depth, 2 if i == 0 else 1))
                in_channel = depth
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class _DwConv(nn.Module):
    """Holds `conv` (pools.N.conv) or `proj.0` (pos_block.N.proj.0): built by the released code, never called."""

    def __init__(self, dim: int, attr: str):
        super().__init__()
        conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        if attr == 'conv':
            self.conv = conv
        else:
            self.proj = nn.Sequential(conv)


class Vit(nn.Module):
    """The authors' `vit`: conv embedding + position embedding, two block groups, AU heads between them."""

    def __init__(self, in_dim: int, dim: int, depths: Sequence[int], regions: int, num_classes: int,
                 tokens: int, pos_blocks: int):
        super().__init__()
        heads = dim // 32  # head width 32
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pools = nn.ModuleList([_DwConv(dim, 'conv')])
        self.pos_block = nn.ModuleList([_DwConv(dim, 'proj') for _ in range(pos_blocks)])
        self.patch_embed = nn.Conv2d(in_dim, dim, 3, 1, 1)
        self.transformers = nn.ModuleList([Transformer(dim, d, heads) for d in depths])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.regions = regions
        if regions == 7:
            for name in REGIONS_7:
                setattr(self, f'norm_{name}', nn.LayerNorm(dim, eps=1e-6))
            for name, (_, outs) in REGIONS_7.items():
                setattr(self, f'head_{name}', nn.Linear(dim, outs))
        elif regions == 2:
            self.norm_AU_up = nn.LayerNorm(dim, eps=1e-6)
            self.norm_AU_low = nn.LayerNorm(dim, eps=1e-6)
            self.upperAU_head = nn.Linear(dim, REGIONS_2['up'][1])
            self.lowerAU_head = nn.Linear(dim, REGIONS_2['low'][1])
        self.output_layer = nn.Sequential(nn.Dropout(), nn.Flatten(), nn.Linear(tokens * dim, dim))  # never called
        self.head = nn.Linear(dim, num_classes)


class ReferenceAuCvt(nn.Module):
    """The authors' AU-CVT (7-region, 2-region or no AU branch), with their module names.

    Args:
        regions: 7 (RAF-AU layout, 21 AUs), 2 (upper/lower, 16 OpenFace AUs) or 0 (CVT without AUs).
        dim: transformer width (512 in the released code).
        depths: blocks before and after the AU branch.
        layers, channels: IR-50 units and widths of the three stages used.
        pos_blocks: how many unused `pos_block` convs the code builds (2 in the listings).
        squeeze_pooled: `.squeeze()` the pooled region features, as such code does (fails at batch size 1).
    """

    def __init__(self, regions: int = 7, dim: int = 512, depths: Sequence[int] = (4, 2), num_classes: int = 6,
                 layers: Sequence[int] = (3, 4, 14), channels: Sequence[int] = (64, 128, 256), pos_blocks: int = 2,
                 squeeze_pooled: bool = True):
        super().__init__()
        if regions not in (0, 2, 7):
            raise ValueError(f'regions must be 0, 2 or 7, not {regions}.')
        self.grid = 14
        self.cnn = Backbone(layers, channels)
        self.norm = nn.LayerNorm((self.grid * self.grid, channels[-1]))  # never called
        self.vit = Vit(channels[-1], dim, depths, regions, num_classes, self.grid * self.grid, pos_blocks)
        self.squeeze_pooled = squeeze_pooled
        self.pretrained_cfg = {'input_size': (3, 112, 112)}  # what the benchmark reads

    def _pooled(self, grid: torch.Tensor, box: Tuple[int, int, int, int]) -> torch.Tensor:
        r0, r1, c0, c1 = box
        x = grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3), keepdim=True)
        return x.squeeze() if self.squeeze_pooled else x.flatten(1)

    def forward_with_aus(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(self.cnn(x))
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2) + vit.pos_embed
        x = vit.transformers[0](x)
        grid = x.transpose(1, 2).reshape(B, C, H, W)
        if vit.regions == 7:
            out = {name: getattr(vit, f'head_{name}')(getattr(vit, f'norm_{name}')(self._pooled(grid, box)))
                   for name, (box, _) in REGIONS_7.items()}
            eye = torch.max(out['AU11'], out['AU13'])
            cheek = torch.max(out['AU21'], out['AU23'])
            aus = torch.cat([eye[:, 0:2], out['AU12'], eye[:, 2:3], cheek, eye[:, 3:4], out['AU22'], out['AU3']], 1)
        elif vit.regions == 2:
            aus = torch.cat([vit.upperAU_head(vit.norm_AU_up(self._pooled(grid, REGIONS_2['up'][0]))),
                             vit.lowerAU_head(vit.norm_AU_low(self._pooled(grid, REGIONS_2['low'][0])))], 1)
        else:
            aus = x.new_zeros(B, 0)
        x = vit.transformers[1](x)
        return vit.head(vit.norm(x.mean(dim=1))), aus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aus(x)[0]
