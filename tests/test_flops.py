"""FLOP handles for the NA ops in mmengine's analysis, and the published NAT FLOPs."""
import warnings

import pytest
import torch
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info

import nat_mm.flops  # noqa: F401  (registers the handles)
from nat_mm.flops import flop_analyzer
from nat_mm.models import NAT
from nat_mm.models.attention import NeighborhoodAttention
from nat_mm.ops import backend_info

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)
PUBLISHED_GFLOPS = {'mini': 2.7, 'tiny': 4.3, 'small': 7.8, 'base': 13.7}


def na_flops(analyzer):
    counts = analyzer.by_operator()
    return {k: v for k, v in counts.items() if k.startswith('na2d')}


def quiet(analyzer):
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


@pytest.mark.parametrize('dilation', [1, 2])
def test_fused_na_counts_two_matmuls(dilation):
    layer = NeighborhoodAttention(64, 4, kernel_size=5, dilation=dilation).eval()
    x = torch.randn(2, 11, 12, 64)
    per_matmul = 2 * 4 * 11 * 12 * 5 * 5 * 16  # B*heads*H*W*kh*kw*D
    assert na_flops(quiet(FlopAnalyzer(layer, (x, )))) == {'na2d_fused': 2 * per_matmul}
    assert na_flops(quiet(flop_analyzer(layer, (x, )))) == {'na2d_fused': 2 * per_matmul}


def test_unfused_na_counts_each_matmul():
    layer = NeighborhoodAttention(64, 4, kernel_size=3, attn_drop_rate=0.1).train()
    x = torch.randn(1, 6, 7, 64)
    per_matmul = 4 * 6 * 7 * 3 * 3 * 16
    assert na_flops(quiet(FlopAnalyzer(layer, (x, )))) == {'na2d_qk': per_matmul,
                                                           'na2d_av': per_matmul}


def test_padded_map_counts_padded_size():
    layer = NeighborhoodAttention(32, 2, kernel_size=7).eval()  # a 4x5 map runs as 7x7
    flops = na_flops(quiet(FlopAnalyzer(layer, (torch.randn(1, 4, 5, 32), ))))
    assert flops == {'na2d_fused': 2 * 2 * 7 * 7 * 49 * 16}


def test_get_model_complexity_info_includes_na():
    layer = NeighborhoodAttention(32, 2, kernel_size=3).eval()
    info = get_model_complexity_info(layer, inputs=(torch.randn(1, 6, 6, 32), ),
                                     show_table=False, show_arch=False)
    linear = 6 * 6 * 32 * 96 + 6 * 6 * 32 * 32
    assert info['flops'] == linear + 2 * 2 * 6 * 6 * 9 * 16
    assert info['activations'] > 0


@pytest.mark.parametrize('arch', list(PUBLISHED_GFLOPS))
def test_backbone_flops_match_published(arch):
    """Backbone at 224x224 vs. the papers' classification FLOPs: the classifier adds
    only its final norm, pooling and 1000-way head (< 0.02 G) and lacks the backbone's
    norm0..norm2 (< 0.01 G), well inside the 3% tolerance."""
    if arch != 'mini' and backend_info()['cpu'] == 'reference':
        pytest.skip('a 224px forward per arch is too slow on the reference kernels')
    model = NAT(arch=arch).eval()
    analyzer = quiet(FlopAnalyzer(model, (torch.randn(1, 3, 224, 224), )))
    gflops = analyzer.total() / 1e9
    assert gflops == pytest.approx(PUBLISHED_GFLOPS[arch], rel=0.03)
    assert 'na2d_fused' in analyzer.by_operator()
