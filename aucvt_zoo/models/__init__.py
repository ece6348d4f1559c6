"""Model families of the zoo; importing this package registers every model with timm."""
from .au_branch import AuBranch, RegionHead
from .cvt import CVT
from .ir50 import IResNet, remap_evolve_state_dict

__all__ = ['AuBranch', 'CVT', 'IResNet', 'RegionHead', 'remap_evolve_state_dict']
