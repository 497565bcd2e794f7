"""NAT: the Neighborhood Attention Transformer as an OpenMMLab detection/segmentation
backbone, parameter-compatible with the upstream NAT / DiNAT checkpoints."""
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .builders import build_norm
from .layers import ConvTokenizer, NATLevel, to_channels_first
from .presets import ARCH_SETTINGS, Dilations, resolve_dilations

ARCH_KEYS = ('embed_dims', 'depths', 'num_heads', 'mlp_ratio', 'layer_scale')
NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def linspace(start: float, end: float, steps: int) -> List[float]:
    # plain Python, so a model can be built under torch.device('meta')
    return [start + (end - start) * i / max(steps - 1, 1) for i in range(steps)]


class NAT(BaseModule):
    """Neighborhood Attention Transformer backbone (NAT; DiNAT with ``dilations``).

    Args:
        arch (str | dict | None): 'mini', 'tiny', 'small' or 'base' (see
            ``presets.ARCH_SETTINGS``), a dict with the keys embed_dims, depths,
            num_heads, mlp_ratio, layer_scale, or None to give them all explicitly.
        embed_dims, depths, num_heads, mlp_ratio, layer_scale: override the arch's
            values when not None. layer_scale None means no layer scale (gamma1/gamma2
            are created only for a float).
        kernel_size (int): neighborhood size. Defaults to 7.
        dilations (None | str | list[list[int]]): per-level lists of per-block
            dilations, a DiNAT preset name ('imagenet', 'imagenet384', 'coco', 'ade'),
            or None for NAT (all 1).
        in_channels (int): input image channels. Defaults to 3.
        qkv_bias (bool): bias in the qkv projection. Defaults to True.
        drop_rate (float): dropout after the stem, in the MLPs and after the
            attention projection.
        attn_drop_rate (float): dropout on the attention weights; when > 0 the layer
            uses the unfused na2d_qk / softmax / dropout / na2d_av path while training.
        drop_path_rate (float): stochastic depth, linearly increasing over the blocks.
        out_indices (Sequence[int]): levels whose (pre-downsampling) outputs are
            returned, each through its own norm ``norm{i}``.
        norm_cfg (dict): channels-last norm, LayerNorm ('LN'). act_cfg (dict): MLP
            activation. frozen_stages (int): -1 none; 0 the stem; i > 0 the stem and
            levels 0..i-1 with their output norms. norm_eval (bool): keep norm layers
            in eval mode while training (LayerNorm has no running statistics, so this
            only matters for BatchNorm-like layers). with_cp (bool): activation
            checkpointing per block.
        pretrained (str, optional): deprecated, use
            ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg (dict, optional): None initialises from scratch; ``type='Pretrained'``
            loads a checkpoint with ``nat_mm.checkpoint`` (extra key: ``strict``,
            default True: anything but the missing output norms is an error).
    """
    arch_zoo: Dict[str, dict] = ARCH_SETTINGS

    def __init__(self,
                 arch: Union[str, dict, None] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratio: Optional[float] = None,
                 layer_scale: Optional[float] = None,
                 kernel_size: int = 7,
                 dilations: Dilations = None,
                 in_channels: int = 3,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.2,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 norm_cfg: dict = dict(type='LN'),
                 act_cfg: dict = dict(type='GELU'),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        init_cfg = self._fold_pretrained(pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg)
        settings = self._arch_settings(arch, dict(
            embed_dims=embed_dims, depths=depths, num_heads=num_heads,
            mlp_ratio=mlp_ratio, layer_scale=layer_scale))
        self.embed_dims = settings['embed_dims']
        self.depths = tuple(settings['depths'])
        self.num_heads = tuple(settings['num_heads'])
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f'depths {self.depths} and num_heads {self.num_heads} must '
                             f'have one entry per level')
        self.num_levels = len(self.depths)
        self.num_features = [self.embed_dims * 2**i for i in range(self.num_levels)]
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be an odd int >= 3 (one square window for '
                             f'every level, as in NAT and DiNAT), got {kernel_size!r}')
        self.kernel_size = kernel_size
        self.dilations = resolve_dilations(dilations, self.depths)
        self.out_indices = self._check_out_indices(out_indices)
        if not -1 <= frozen_stages <= self.num_levels:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_levels}], got '
                             f'{frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.patch_embed = ConvTokenizer(in_channels, self.embed_dims, norm_cfg)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = linspace(0., drop_path_rate, sum(self.depths))
        self.levels = nn.ModuleList()
        for i, depth in enumerate(self.depths):
            first = sum(self.depths[:i])
            self.levels.append(NATLevel(
                self.num_features[i], depth, self.num_heads[i], self.dilations[i],
                drop_path_rates[first:first + depth],
                downsample=i < self.num_levels - 1, norm_cfg=norm_cfg,
                kernel_size=kernel_size, mlp_ratio=settings['mlp_ratio'],
                qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                layer_scale=settings['layer_scale'], act_cfg=act_cfg, with_cp=with_cp))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg, self.num_features[i]))
        self._freeze_stages()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _fold_pretrained(pretrained: Optional[str],
                         init_cfg: Optional[dict]) -> Optional[dict]:
        if pretrained is None:
            return init_cfg
        if init_cfg is not None:
            raise ValueError(
                f'init_cfg and pretrained ({pretrained!r}) cannot both be set; use init_cfg. '
                'If your config does not set pretrained, it comes from model.pretrained of a '
                "base config (mmseg's segmentors pass it to the backbone): set "
                'model.pretrained=None')
        if not isinstance(pretrained, str):
            raise TypeError(f'pretrained must be a str or None, got {type(pretrained)}')
        warnings.warn('DeprecationWarning: pretrained is deprecated, use '
                      'init_cfg=dict(type="Pretrained", checkpoint=...) instead')
        return dict(type='Pretrained', checkpoint=pretrained)

    def _arch_settings(self, arch: Union[str, dict, None], overrides: dict) -> dict:
        if isinstance(arch, str):
            if arch not in self.arch_zoo:
                raise ValueError(f'unknown arch {arch!r} for {type(self).__name__}, '
                                 f'choose one of {sorted(self.arch_zoo)} or pass a dict')
            settings = dict(self.arch_zoo[arch])
        elif isinstance(arch, dict):
            settings = {'layer_scale': None, **arch}  # layer_scale is optional
        elif arch is None:
            settings = dict(layer_scale=None)
        else:
            raise TypeError(f'arch must be a str, a dict or None, got {type(arch)}')
        settings.update({k: v for k, v in overrides.items() if v is not None})
        missing = [k for k in ARCH_KEYS if k not in settings]
        if missing:
            raise ValueError(f'arch settings miss {missing}: give an arch name or all of '
                             f'{list(ARCH_KEYS)}')
        return settings

    def _check_out_indices(self, out_indices: Sequence[int]) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        if not isinstance(out_indices, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
            raise TypeError(f'out_indices must be an int or a sequence of ints, got '
                            f'{out_indices!r}')
        if any(not -self.num_levels <= i < self.num_levels for i in out_indices):
            raise ValueError(f'out_indices {out_indices} out of range for '
                             f'{self.num_levels} levels')
        levels = tuple(i % self.num_levels for i in out_indices)
        # the outputs come in level order, one per level: say so rather than reorder
        if not levels or any(a >= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f'out_indices {tuple(out_indices)} must name distinct levels '
                             f'in increasing order (outputs come in level order), e.g. '
                             f'{tuple(sorted(set(levels))) or (0, 1, 2, 3)}')
        return levels

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, level in enumerate(self.levels):
            x, level_out = level(x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                outs.append(to_channels_first(norm(level_out)).contiguous())
        return tuple(outs)

    # ------------------------------------------------------------------ training mode
    def _frozen_modules(self):
        if self.frozen_stages >= 0:  # the stem, and its dropout (else frozen levels see noise)
            yield self.patch_embed
            yield self.pos_drop
        for i in range(min(self.frozen_stages, self.num_levels)):
            yield self.levels[i]
            if i in self.out_indices:
                yield getattr(self, f'norm{i}')

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'NAT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, NORM_TYPES):
                    module.eval()
        return self

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        cfg = self._pretrained_cfg(self.init_cfg)
        if self.init_cfg is None:
            self._init_from_scratch()
        elif cfg is not None:
            from nat_mm.checkpoint import load_pretrained
            self._init_from_scratch()  # for whatever the checkpoint does not hold
            load_pretrained(self, cfg['checkpoint'], strict=cfg.get('strict', True),
                            prefix=cfg.get('prefix'))
        else:  # any other mmengine initializer config
            super().init_weights()
        self._is_init = True

    @staticmethod
    def _pretrained_cfg(init_cfg) -> Optional[dict]:
        """The Pretrained entry of init_cfg (a dict, or a list holding it alone), which
        nat_mm's loader serves: mmengine's would not find upstream checkpoints' weights
        (under 'model') nor strip 'backbone.', and would load nothing without an error."""
        entries = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
        pretrained = [c for c in entries
                      if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if not pretrained:
            return None
        if len(entries) > 1:
            raise ValueError(f'init_cfg {init_cfg}: a Pretrained entry must stand alone '
                             '(the checkpoint sets every weight; the rest start from the '
                             "backbone's own init): pass dict(type='Pretrained', ...)")
        return pretrained[0]

    def _init_from_scratch(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith('attn.rpb'):
                nn.init.trunc_normal_(param, std=.02)

    # ------------------------------------------------------------------ layer decay
    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter for layer-wise lr decay (mmpretrain convention).

        Returns (depth, num_layers) with num_layers = sum(depths) + 2: the stem is 0,
        blocks are numbered 1..sum(depths) across levels, a level's downsampler goes
        with the first block of the next level, ``norm{i}`` with the last block of
        level i, and anything else (outside the backbone) gets num_layers - 1.
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        parts = param_name[len(prefix):].split('.')
        if parts[0] == 'patch_embed':
            return 0, num_layers
        if parts[0] == 'levels':
            level = int(parts[1])
            if parts[2] == 'blocks':
                return sum(self.depths[:level]) + int(parts[3]) + 1, num_layers
            return sum(self.depths[:level + 1]) + 1, num_layers  # downsample
        if parts[0].startswith('norm') and parts[0][4:].isdigit():
            return sum(self.depths[:int(parts[0][4:]) + 1]), num_layers
        return num_layers - 1, num_layers
