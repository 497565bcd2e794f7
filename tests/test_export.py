"""Deployment: torch.export with dynamic sizes, and ONNX with the NA ops decomposed."""
import os
import warnings

import pytest
import torch

from nat_mm.export import decompose_na, export_backbone, export_onnx, na_decompositions
from nat_mm.ops import na2d_av_reference, na2d_qk_reference, na2d_reference
from test_backbone_utils import padded_dinat
from tool_modules import import_tool

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# inputs whose padding differs from the traced 64x96 (levels 1 and 3 pad rows only there):
# 48x64 pads level 0 rows, 80x48 pads columns at levels 0-1, 144x112 pads nothing
SIZES = [(1, (48, 64)), (3, (80, 48)), (2, (144, 112))]


def _assert_matches_eager(model, run, atol):
    with torch.no_grad():
        for batch, size in SIZES:
            x = torch.randn(batch, 3, *size)
            for got, want in zip(run(x), model(x)):
                torch.testing.assert_close(torch.as_tensor(got), want, atol=atol, rtol=atol)


@pytest.mark.parametrize('shape, kernel_size, dilation', [
    ((1, 2, 9, 11, 8), (3, 5), (2, 1)),       # rectangular kernel, dilation on one axis
    ((2, 1, 13, 15, 6), (5, 3), (2, 3)),      # odd sizes, both axes dilated
    ((1, 1, 7, 7, 4), (7, 7), (1, 1)),        # kernel == map
])
def test_decompositions_match_the_reference(shape, kernel_size, dilation):
    """The standard-op forms of the NA ops (what ONNX gets) against the reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(shape[1], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1,
                      dtype=torch.float64)
    attn = torch.randn(*shape[:4], kernel_size[0] * kernel_size[1], dtype=torch.float64)
    table = {o.name(): fn for o, fn in na_decompositions().items()}
    torch.testing.assert_close(table['nat_mm::na2d_qk'](q, k, rpb, kernel_size, dilation),
                               na2d_qk_reference(q, k, kernel_size, dilation, rpb))
    torch.testing.assert_close(table['nat_mm::na2d_av'](attn, v, kernel_size, dilation),
                               na2d_av_reference(attn, v, kernel_size, dilation))
    out, lse = table['nat_mm::na2d_fused'](q, k, v, rpb, kernel_size, dilation, 0.3)
    torch.testing.assert_close(out, na2d_reference(q, k, v, kernel_size, dilation, rpb, 0.3))
    logits = na2d_qk_reference(q * 0.3, k, kernel_size, dilation, rpb)
    torch.testing.assert_close(lse, logits.logsumexp(-1))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return padded_dinat().eval()


@pytest.fixture(scope='module')
def program(model):
    return export_backbone(model, min_size=48, max_size=1024, example_size=(64, 96))


def test_export_serves_every_batch_and_size(model, program):
    """One exported program for any batch and size (deployment, AOTInductor): without the
    export-time padding in the attention layer the traced size's padding became a guard
    and a smaller input was refused."""
    assert any('nat_mm.na2d_fused' in str(n.target) for n in program.graph.nodes)
    _assert_matches_eager(model, program.module(), 1e-5)


def test_export_checks_its_size_range(model):
    with pytest.raises(ValueError, match='min_size'):
        export_backbone(model, min_size=32)
    with pytest.raises(ValueError, match='example_size'):
        export_backbone(model, example_size=(200, 224))


def test_decomposed_program_has_only_standard_ops(model, program):
    decomposed = decompose_na(program)
    assert not [n for n in decomposed.graph.nodes if 'nat_mm' in str(n.target)]
    _assert_matches_eager(model, decomposed.module(), 1e-5)


def test_onnx_export_runs_in_onnxruntime(model, tmp_path):
    pytest.importorskip('onnxscript')
    onnxruntime = pytest.importorskip('onnxruntime')
    path = export_onnx(model, str(tmp_path / 'backbone.onnx'), min_size=48, max_size=1024,
                       example_size=(64, 96))
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    _assert_matches_eager(model, lambda x: session.run(None, {name: x.numpy()}), 1e-4)


def test_export_tool_builds_the_configs_backbone():
    """tools/export_onnx.py takes the backbone of an mm config (or --arch)."""
    pytest.importorskip('mmdet')
    tool = import_tool('export_onnx')
    args = tool.parse_args([os.path.join(REPO, 'configs/detection/dinat_tiny_maskrcnn.py')])
    model = tool.build_backbone(args)
    assert type(model).__name__ == 'DiNAT' and model.levels[1].blocks[1].attn.dilation > 1
    with pytest.raises(SystemExit):
        tool.parse_args([])  # neither a config nor --arch
