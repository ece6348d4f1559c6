"""The AU branch of AU-CVT (arXiv:2207.09777, section 3.3): region pooling, per-region heads, symmetric maxout.

The region boxes and the AU -> face-area table are data in `aucvt_zoo.labels`; one loop serves every layout and
every AU label set. Pooling all regions is one matrix product with a (regions x cells) averaging matrix, and
assembling the AU logits in label order, with the max over each symmetric pair, is one gather and one max.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..labels import regions_for, resolve_aus

__all__ = ['AuBranch', 'RegionHead']


class RegionHead(nn.Module):
    """LayerNorm and a linear layer over one region's pooled feature vector."""

    def __init__(self, dim: int, num_aus: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, num_aus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class AuBranch(nn.Module):
    """AU logits from a token map: average-pool each region, LayerNorm + linear per region, symmetric maxout.

    Args:
        dim: channels of the token map.
        aus: an AU label set name ('rafau21', 'openface16') or a list of AUs ('AU6', 12, ...).
        layout: region layout in `aucvt_zoo.labels.REGION_LAYOUTS` ('paper7' or 'released2').
        grid: (height, width) of the token map the branch reads; the region boxes are scaled to it.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
            self,
            dim: int,
            aus: Union[str, Sequence[Union[str, int]]],
            layout: str = 'paper7',
            grid: Tuple[int, int] = (14, 14),
            norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.au_names = resolve_aus(aus)
        if not self.au_names:
            raise ValueError('An AU branch needs at least one AU; build the model without au_labels instead.')
        self.layout = layout
        self.grid = (int(grid[0]), int(grid[1]))
        height, width = self.grid
        regions = regions_for(self.au_names, layout)
        self.region_aus = {region.name: aus for region, aus in regions}
        self.region_cells = {
            region.name: region.cells(height, width) for region, _ in regions}
        self.regions = nn.ModuleDict({
            region.name: RegionHead(dim, len(aus), norm_eps) for region, aus in regions})

        pool = torch.zeros(len(regions), height, width)
        for i, (r0, r1, c0, c1) in enumerate(self.region_cells.values()):
            pool[i, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
        self.register_buffer('pool_weights', pool.flatten(1), persistent=False)

        # Where each AU's logit sits in the concatenated region outputs, once per region that predicts it.
        # Symmetric pairs give two places, the max of which is the AU's logit (symmetric maxout).
        places: Dict[str, List[int]] = {au: [] for au in self.au_names}
        offset = 0
        for region_aus in self.region_aus.values():
            for j, au in enumerate(region_aus):
                places[au].append(offset + j)
            offset += len(region_aus)
        group = max(len(p) for p in places.values())
        index = [[places[au][min(m, len(places[au]) - 1)] for au in self.au_names] for m in range(group)]
        self.register_buffer('gather_index', torch.tensor(index, dtype=torch.long), persistent=False)
        self._grid_error = (
            f'The AU branch reads a {height}x{width} token map (the regions are laid out for it); the input image '
            f'has a different size. Resize aligned faces to the model\'s pretrained_cfg["input_size"].')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """AU logits (B, num_aus) in label order from a (B, H, W, C) token map."""
        B, H, W, C = x.shape
        torch._assert(H == self.grid[0], self._grid_error)
        torch._assert(W == self.grid[1], self._grid_error)
        pooled = torch.matmul(self.pool_weights.to(x.dtype), x.reshape(B, H * W, C))  # (B, regions, C)
        outs: List[torch.Tensor] = []
        i = 0
        for head in self.regions.values():
            outs.append(head(pooled[:, i]))
            i += 1
        logits = torch.cat(outs, dim=1)
        return logits[:, self.gather_index].amax(dim=1)
