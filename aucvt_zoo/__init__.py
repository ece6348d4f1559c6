"""aucvt_zoo: AU-CVT and IR-50 facial expression recognition models for timm (arXiv:2207.09777).

Importing the package registers its models with timm:

    import aucvt_zoo, timm
    model = timm.create_model('aucvt_openface', pretrained=True)
    expression_logits, au_logits = model.forward_with_aus(faces)   # aligned 112x112 RGB, mean = std = 0.5
"""
__version__ = '0.1.0'

from . import labels
from .hub import HUB_NAMESPACE, PretrainedWeightsError
from .labels import AU_SETS, EXPRESSIONS
from .models import CVT, AuBranch, IResNet

MODEL_NAMES = (
    'ir50', 'ir50_tiny', 'cvt_ir50', 'aucvt_raf', 'aucvt_openface', 'cvt_ir50_released', 'aucvt_raf_released',
    'aucvt_openface_released', 'cvt_ir50_tiny', 'aucvt_raf_tiny', 'aucvt_openface_tiny',
)

__all__ = [
    '__version__', 'labels', 'AU_SETS', 'EXPRESSIONS', 'HUB_NAMESPACE', 'MODEL_NAMES', 'PretrainedWeightsError',
    'CVT', 'AuBranch', 'IResNet',
]
