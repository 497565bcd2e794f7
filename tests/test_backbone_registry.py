"""NAT / DiNAT are built by name through the mmdet and mmseg MODELS registries."""
import copy
import importlib
import warnings

import pytest
import torch

from nat_mm.models import DiNAT, NAT

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_build_through_mm_registry(package):
    pytest.importorskip(package)
    from mmengine.registry import DefaultScope
    import nat_mm.models  # noqa: F401  (registers)
    models = importlib.import_module(f'{package}.registry').MODELS
    assert models.get('NAT') is NAT and models.get('DiNAT') is DiNAT
    with DefaultScope.overwrite_default_scope(package):
        from mmengine.registry import MODELS as ROOT
        backbone = ROOT.build(dict(type='DiNAT', arch='mini', depths=(1, 1, 1, 1),
                                   dilations=[[2], [1], [1], [1]], out_indices=(1, 2)))
    assert isinstance(backbone, DiNAT)
    outs = backbone.eval()(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [128, 256]
    built = models.build(dict(type='NAT', arch='small', depths=(1, 1, 1, 1)))
    assert isinstance(built, NAT) and built.embed_dims == 96


def test_registration_is_idempotent_and_optional():
    from nat_mm.models.registry import MM_PACKAGES, register_in_mm
    installed = [p for p in MM_PACKAGES if importlib.util.find_spec(p) is not None]
    assert register_in_mm('MODELS', {'NAT': NAT, 'DiNAT': DiNAT}) == installed


def test_swapping_into_an_mmseg_base_names_its_inherited_pretrained(tmp_path):
    """mmseg's segmentors pass model.pretrained (a ResNet checkpoint in mmseg's bases) to the
    backbone: the error must say where it came from and how to clear it."""
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    import nat_mm.models  # noqa: F401  (registers)
    path = tmp_path / 'nat_in_mmseg_base.py'
    path.write_text("_base_ = 'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py'\n")
    cfg = Config.fromfile(str(path))
    cfg.model.backbone = dict(type='NAT', arch='mini', depths=(1, 1, 1, 1),
                              init_cfg=dict(type='Pretrained', checkpoint='nat_mini.pth'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        with pytest.raises(ValueError, match=r"\('open-mmlab://resnet50_v1c'\).*"
                                             r'model\.pretrained=None'):
            MODELS.build(copy.deepcopy(cfg.model))  # (it writes pretrained into the copy)
        cfg.model.pretrained = None
        assert isinstance(MODELS.build(cfg.model).backbone, NAT)
