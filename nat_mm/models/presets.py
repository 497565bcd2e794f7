"""Published NAT / DiNAT architectures and DiNAT dilation sets (NAT_REFERENCE.md §2)."""
from typing import Dict, List, Sequence, Union

ARCH_SETTINGS: Dict[str, dict] = {
    'mini': dict(embed_dims=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
                 mlp_ratio=3.0, layer_scale=None),
    'tiny': dict(embed_dims=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16),
                 mlp_ratio=3.0, layer_scale=None),
    'small': dict(embed_dims=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24),
                  mlp_ratio=2.0, layer_scale=1e-5),
    'base': dict(embed_dims=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32),
                 mlp_ratio=2.0, layer_scale=1e-5),
}
# DiNAT-Large was only published with dilations.
DINAT_ARCH_SETTINGS: Dict[str, dict] = dict(
    ARCH_SETTINGS,
    large=dict(embed_dims=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48),
               mlp_ratio=2.0, layer_scale=None))

# Per-level lists of per-block dilations, for depths (3, 4, 18, 5). The mini arch
# (depths (3, 4, 6, 5)) uses the first blocks of each level, as upstream did.
DILATION_PRESETS: Dict[str, List[List[int]]] = {
    'imagenet': [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5],
    'imagenet384': [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5],
    'coco': [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]],
    'ade': [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]],
}

Dilations = Union[None, str, Sequence[Sequence[int]]]


def resolve_dilations(dilations: Dilations, depths: Sequence[int]) -> List[List[int]]:
    """Per-level, per-block dilations for ``depths``.

    None means no dilation (NAT); a preset name picks a published DiNAT set, cut to
    ``depths``; explicit lists must match ``depths`` exactly.
    """
    if dilations is None:
        return [[1] * depth for depth in depths]
    if isinstance(dilations, str):
        if dilations not in DILATION_PRESETS:
            raise ValueError(f'unknown dilation preset {dilations!r}, choose one of '
                             f'{sorted(DILATION_PRESETS)} or pass per-level lists')
        preset = DILATION_PRESETS[dilations]
        if any(depth > len(level) for depth, level in zip(depths, preset)):
            raise ValueError(f'the {dilations!r} dilation preset has '
                             f'{[len(level) for level in preset]} blocks per level, '
                             f'fewer than depths {list(depths)}: pass explicit lists')
        return [list(level[:depth]) for depth, level in zip(depths, preset)]
    if not isinstance(dilations, (list, tuple)) or not all(
            isinstance(level, (list, tuple)) for level in dilations):
        raise TypeError(f'dilations must be None, a preset name or per-level lists of '
                        f'per-block ints (lengths {list(depths)}), got {dilations!r}')
    dilations = [list(level) for level in dilations]
    if [len(level) for level in dilations] != list(depths):
        raise ValueError(f'dilations must give one value per block, i.e. lists of lengths '
                         f'{list(depths)}, got {[len(level) for level in dilations]}')
    if any(int(d) != d or d < 1 for level in dilations for d in level):
        raise ValueError(f'dilations must be positive ints, got {dilations}')
    return [[int(d) for d in level] for level in dilations]
