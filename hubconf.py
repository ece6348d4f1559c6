"""torch.hub entry points: `torch.hub.load('<owner>/<repo>', 'aucvt_openface', pretrained=True)`.

Every zoo model is one entry; keyword arguments go to `timm.create_model` (num_classes, au_labels, ...).
"""
dependencies = ['torch', 'torchvision', 'timm', 'huggingface_hub', 'safetensors']

import timm as _timm

import aucvt_zoo as _zoo


def _entry(name: str):
    def create(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__doc__ = _timm.models.model_entrypoint(name).__doc__
    return create


for _name in _zoo.MODEL_NAMES:
    globals()[_name] = _entry(_name)
