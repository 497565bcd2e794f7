"""DiNAT: NAT with per-block dilations (Dilated Neighborhood Attention Transformer)."""
from .nat import NAT
from .presets import DILATION_PRESETS, DINAT_ARCH_SETTINGS


class DiNAT(NAT):
    """NAT with dilated neighborhood attention; adds the 'large' arch.

    ``dilations`` is required: a published set by name — 'coco' (detection), 'ade'
    (segmentation), 'imagenet' (224px), 'imagenet384' — or explicit per-level lists.
    All other arguments are those of :class:`NAT`.
    """
    arch_zoo = DINAT_ARCH_SETTINGS

    def __init__(self, arch='tiny', *, dilations=None, **kwargs):
        if dilations is None:
            raise ValueError(f'DiNAT needs dilations: one of {sorted(DILATION_PRESETS)} '
                             f'(e.g. "coco" for detection, "ade" for segmentation) or '
                             f'per-level lists of per-block dilations')
        super().__init__(arch, dilations=dilations, **kwargs)
