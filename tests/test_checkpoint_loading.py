"""Loading upstream-format and mm-format checkpoints: key conversion, rpb resize,
safety, the logged report, strictness, and tools/convert_checkpoint.py."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger

from nat_mm.checkpoint import (CheckpointLoadError, infer_arch, load_pretrained,
                               resize_rpb)
from nat_mm.models import DiNAT, NAT
from test_backbone_utils import OUTPUT_NORM, TINY_KWARGS, tiny_upstream_state_dict
from tool_modules import import_tool

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def log_file(tmp_path, request):
    """A fresh current MMLogger writing to a file; yields a function reading it."""
    path = tmp_path / 'log.txt'
    MMLogger.get_instance(f'nat_ckpt_{request.node.name}', log_file=str(path))
    return lambda: path.read_text()


def save(tmp_path, obj, name='ckpt.pth'):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def pretrained(path, **kwargs):
    return dict(type='Pretrained', checkpoint=path, **kwargs)


def assert_loaded(model, upstream):
    state = model.state_dict()
    for key, value in upstream.items():
        if not key.startswith(('head.', 'norm.')):
            torch.testing.assert_close(state[key], value, atol=0, rtol=0)


@pytest.mark.parametrize('layout', ['flat', 'model', 'state_dict'])
def test_upstream_classification_checkpoint(tmp_path, log_file, layout):
    upstream = tiny_upstream_state_dict()
    obj = {'flat': upstream, 'model': {'model': upstream, 'epoch': 300},
           'state_dict': {'state_dict': upstream, 'meta': {'arch': 'nat'}}}[layout]
    path = save(tmp_path, obj)
    model = NAT(**TINY_KWARGS, init_cfg=pretrained(path))
    model.init_weights()
    assert_loaded(model, upstream)
    log = log_file()
    backbone_tensors = len(upstream) - 4  # minus head.{weight,bias}, norm.{weight,bias}
    assert f'Loaded {backbone_tensors} tensors from {path}' in log
    assert 'Dropped 4 keys' in log and 'head.weight' in log
    for i in range(4):
        assert f'norm{i}.weight' in log and f'norm{i}.bias' in log
    assert 'Missing keys, expected' in log
    assert 'Unexpected keys' not in log and 'Shape mismatch' not in log


def test_report_object_contents(tmp_path):
    upstream = tiny_upstream_state_dict()
    report = load_pretrained(NAT(**TINY_KWARGS), save(tmp_path, upstream), logger='silent')
    assert len(report.loaded) == len(upstream) - 4 and report.ok
    assert sorted(report.missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                            for p in ('weight', 'bias'))
    assert report.unexpected == [] and report.mismatched == [] and report.resized == []
    assert sorted(report.dropped) == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']


@pytest.mark.parametrize('wrapper', ['', 'module.'])
def test_mm_detection_checkpoint(tmp_path, log_file, wrapper):
    backbone = tiny_upstream_state_dict(classifier=False)
    backbone.update({f'norm{i}.{p}': torch.full((32 * 2**i, ), float(i))
                     for i in range(4) for p in ('weight', 'bias')})
    state = {f'{wrapper}backbone.{k}': v for k, v in backbone.items()}
    state[f'{wrapper}neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    path = save(tmp_path, {'state_dict': state, 'meta': {'epoch': 36}})
    model = DiNAT(**TINY_KWARGS, dilations=[[2], [1], [1], [1]], init_cfg=pretrained(path))
    model.init_weights()
    assert_loaded(model, backbone)
    log = log_file()
    assert f'Loaded {len(backbone)} tensors' in log and 'All backbone weights matched' in log
    assert 'neck.lateral_convs.0.conv.weight' in log and 'Missing keys' not in log


def test_init_cfg_as_a_list(tmp_path):
    """mm configs often give init_cfg as a list: its Pretrained entry goes through nat_mm's
    loader too (mmengine's would load nothing from an upstream file without an error)."""
    upstream = tiny_upstream_state_dict()
    path = save(tmp_path, {'model': upstream})
    model = NAT(**TINY_KWARGS, init_cfg=[pretrained(path)])
    model.init_weights()
    assert_loaded(model, upstream)
    with pytest.raises(ValueError, match='Pretrained entry must stand alone'):
        NAT(**TINY_KWARGS, init_cfg=[pretrained(path),
                                     dict(type='Constant', layer='Linear', val=0)]).init_weights()


def test_pretrained_prefix(tmp_path):
    """init_cfg's prefix (mmengine's Pretrained option) selects and strips keys."""
    upstream = tiny_upstream_state_dict()
    path = save(tmp_path, {'state_dict': {f'module.encoder.{k}': v for k, v in upstream.items()}})
    model = NAT(**TINY_KWARGS, init_cfg=pretrained(path, prefix='encoder.'))
    model.init_weights()
    assert_loaded(model, upstream)
    with pytest.raises(CheckpointLoadError, match="prefix 'decoder.'.*module.encoder"):
        load_pretrained(NAT(**TINY_KWARGS), path, prefix='decoder.', logger='silent')


def test_shape_mismatch_raises_unless_not_strict(tmp_path, log_file):
    upstream = tiny_upstream_state_dict()
    upstream['levels.1.blocks.0.mlp.fc1.weight'] = torch.zeros(5, 64)
    path = save(tmp_path, upstream)
    model = NAT(**TINY_KWARGS, init_cfg=pretrained(path))
    with pytest.raises(CheckpointLoadError, match=r'Shape mismatch: levels.1.blocks.0.mlp'):
        model.init_weights()
    qkv = 'levels.0.blocks.0.attn.qkv.weight'
    assert not torch.equal(model.state_dict()[qkv], upstream[qkv])  # nothing loaded

    model = NAT(**TINY_KWARGS, init_cfg=pretrained(path, strict=False))
    model.init_weights()
    skipped = model.levels[1].blocks[0].mlp.fc1.weight  # kept its from-scratch init
    assert abs(skipped.std().item() - .02) < .005
    assert_loaded(model, {k: v for k, v in upstream.items() if 'mlp.fc1.weight' not in k
                          or not k.startswith('levels.1')})
    assert ('Shape mismatch: levels.1.blocks.0.mlp.fc1.weight is [5, 64] in the checkpoint, '
            '[128, 64] in the model.') in log_file()


def test_unexpected_and_missing_keys_raise(tmp_path):
    deeper = tiny_upstream_state_dict(depths=(2, 1, 1, 1))  # an extra block
    with pytest.raises(CheckpointLoadError, match='Unexpected keys.*levels.0.blocks.1'):
        load_pretrained(NAT(**TINY_KWARGS), save(tmp_path, deeper), logger='silent')
    report = load_pretrained(NAT(**TINY_KWARGS), save(tmp_path, deeper), strict=False,
                             logger='silent')
    assert report.unexpected and all(k.startswith('levels.0.blocks.1.') for k in
                                      report.unexpected)
    # a checkpoint without layer scale in a model with it: gamma1/gamma2 missing
    with pytest.raises(CheckpointLoadError, match=r'Missing keys: \[.*gamma1'):
        load_pretrained(NAT(**TINY_KWARGS, layer_scale=1e-5),
                        save(tmp_path, tiny_upstream_state_dict()), logger='silent')


def test_rpb_is_resized_bicubically_for_another_kernel(tmp_path, log_file):
    upstream = tiny_upstream_state_dict()  # kernel 7: rpb [heads, 13, 13]
    upstream['levels.0.blocks.0.attn.rpb'] = torch.full((2, 13, 13), 0.5)
    path = save(tmp_path, upstream)
    model = NAT(**TINY_KWARGS, kernel_size=5, init_cfg=pretrained(path))
    model.init_weights()
    rpb = model.levels[1].blocks[0].attn.rpb
    assert rpb.shape == (2, 9, 9)
    expected = F.interpolate(upstream['levels.1.blocks.0.attn.rpb'][None], size=(9, 9),
                             mode='bicubic', align_corners=False)[0]
    torch.testing.assert_close(rpb, expected)
    torch.testing.assert_close(model.levels[0].blocks[0].attn.rpb, torch.full((2, 9, 9), 0.5))
    log = log_file()
    assert ('Resized levels.0.blocks.0.attn.rpb bicubically from [2, 13, 13] to [2, 9, 9]'
            in log)
    assert log.count('Resized') == 4 and 'All backbone weights matched' in log


def test_resize_rpb_identity_and_dtype():
    rpb = torch.randn(3, 13, 13, dtype=torch.float64)
    torch.testing.assert_close(resize_rpb(rpb, (13, 13)), rpb)
    assert resize_rpb(rpb.half(), (9, 9)).dtype == torch.float16


class Payload:
    """Pickles as a call to os.system: loading it must not run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = save(tmp_path, {'state_dict': tiny_upstream_state_dict(), 'x': Payload(marker)})
    with pytest.raises(CheckpointLoadError, match='trust'):
        load_pretrained(NAT(**TINY_KWARGS), path, logger='silent')
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path):
    path = tmp_path / 'config.py'
    path.write_text("model = dict(type='NAT')\n")
    with pytest.raises(CheckpointLoadError, match='is not a PyTorch checkpoint') as error:
        load_pretrained(NAT(**TINY_KWARGS), str(path), logger='silent')
    assert 'trust' not in str(error.value) and 'run code' not in str(error.value)


def test_mmengine_metadata_is_accepted(tmp_path):
    import numpy as np
    path = save(tmp_path, {'state_dict': tiny_upstream_state_dict(),
                           'meta': {'eta': np.float64(1.5), 'hist': np.zeros(3)}})
    assert load_pretrained(NAT(**TINY_KWARGS), path, logger='silent').ok


def test_infer_arch():
    arch = infer_arch(tiny_upstream_state_dict(layer_scale=True, kernel_size=5))
    assert arch == dict(arch=None, embed_dims=32, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
                        mlp_ratio=2.0, layer_scale=1e-5, kernel_size=5)


def test_convert_tool(tmp_path):
    convert_checkpoint = import_tool('convert_checkpoint')
    upstream = tiny_upstream_state_dict(layer_scale=True)
    src, dst = save(tmp_path, {'model': upstream}), str(tmp_path / 'mm.pth')
    assert convert_checkpoint.main([src, dst, '--kernel-size', '5']) == 0
    converted = torch.load(dst, weights_only=True)
    keys = converted['state_dict'].keys()
    assert len(keys) == len(upstream) - 4 and all(k.startswith('backbone.') for k in keys)
    assert converted['state_dict']['backbone.levels.0.blocks.0.attn.rpb'].shape == (2, 9, 9)
    model = NAT(**TINY_KWARGS, layer_scale=1e-5, kernel_size=5)
    report = load_pretrained(model, dst, logger='silent')
    assert report.ok and all(OUTPUT_NORM.match(k) for k in report.missing)


def test_convert_tool_reports_bad_input_without_a_traceback(tmp_path, capsys):
    convert_checkpoint = import_tool('convert_checkpoint')
    other = save(tmp_path, {'model': {'fc.weight': torch.zeros(2, 2)}})
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'notes.pth').write_text('not a checkpoint')
    (tmp_path / 'folder.pth').mkdir()
    for src, message in [(other, 'CheckpointLoadError: not a NAT/DiNAT state dict'),
                         (str(tmp_path / 'missing.pth'), 'FileNotFoundError'),
                         (str(tmp_path / 'empty.pth'), 'is not a PyTorch checkpoint'),
                         (str(tmp_path / 'notes.pth'), 'is not a PyTorch checkpoint'),
                         (str(tmp_path / 'folder.pth'), 'IsADirectoryError')]:
        assert convert_checkpoint.main([src, str(tmp_path / 'out.pth')]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'out.pth').exists()


def test_convert_tool_help():
    tool = os.path.join(REPO, 'tools', 'convert_checkpoint.py')
    result = subprocess.run([sys.executable, tool, '--help'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and '--kernel-size' in result.stdout
