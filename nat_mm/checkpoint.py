"""Loading upstream NAT/DiNAT and OpenMMLab checkpoints into the backbone, safely and
with a precise report.

* Files are read on the CPU with ``torch.load(weights_only=True)``: no arbitrary Python
  objects are unpickled (only tensors, containers and a few plain data types that
  training checkpoints carry in their metadata).
* Accepted layouts: a flat state_dict, or one under 'state_dict' / 'model'; keys may
  carry 'module.' (DDP) and 'backbone.' (mm detectors/segmentors) prefixes. Keys of a
  classification head ('head.*', the final 'norm.*') and, in mm checkpoints, keys
  outside the backbone (neck, heads) are dropped and listed.
* A relative position bias of another kernel size is resized bicubically.
* The report lists loaded tensors, missing keys, unexpected keys and shape
  mismatches. Only the backbone's own output norms ``norm{i}`` may be missing (upstream
  classification checkpoints have none); anything else is an error unless
  ``strict=False``.
"""
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import nn

StateDict = Dict[str, torch.Tensor]
Shape = Tuple[int, ...]

# Output norms a backbone adds on top of a classification model.
OPTIONAL_KEY = re.compile(r'^norm\d+\.(weight|bias)$')
# Classification-only keys: the head and the final norm.
CLASSIFIER_KEY = re.compile(r'^(head|norm)\.')
WRAPPER_PREFIXES = ('module.', )
BACKBONE_PREFIX = 'backbone.'


class CheckpointLoadError(RuntimeError):
    """A checkpoint does not fit the model (see the report in the message)."""


# ---------------------------------------------------------------- reading files
def read_checkpoint(filename: str) -> dict:
    """Read a local file or http(s) URL on the CPU with ``torch.load(weights_only=True)``
    (plus the plain metadata types of mm checkpoints, see ``nat_mm.safe_load``)."""
    from nat_mm.safe_load import allow_mm_checkpoint_types, safe_torch_load
    if filename.startswith(('http://', 'https://')):
        allow_mm_checkpoint_types()
        return torch.hub.load_state_dict_from_url(filename, map_location='cpu',
                                                  weights_only=True)
    path = os.path.expanduser(filename)
    if os.path.isfile(path) and not _looks_like_torch_save(path):  # (else torch's own error)
        raise CheckpointLoadError(f'{filename} is not a PyTorch checkpoint (neither a '
                                  f'torch.save zip archive nor a pickle)')
    try:
        return safe_torch_load(path, map_location='cpu')
    except pickle.UnpicklingError as error:
        raise CheckpointLoadError(
            f'{error}. If you trust the file, extract its weights once with '
            f'`python tools/convert_checkpoint.py --trust-pickle {filename} OUT.pth` and '
            f'load OUT.pth.') from None


def _looks_like_torch_save(path: str) -> bool:
    """A torch.save zip archive, or a legacy pickle (protocol 2+ starts with 0x80)."""
    import zipfile
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        return f.read(1) == b'\x80'


def extract_state_dict(checkpoint: dict) -> StateDict:
    """The tensors of a checkpoint: flat, or under 'state_dict' / 'model'."""
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f'a checkpoint must be a dict, got {type(checkpoint)}')
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointLoadError(f'no tensors found in the checkpoint (top-level keys: '
                                  f'{sorted(checkpoint)[:10]})')
    return tensors


def to_backbone_keys(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """Strip wrapper and 'backbone.' prefixes, drop non-backbone keys.

    Returns (backbone state dict, dropped original keys).
    """
    stripped = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        stripped[key] = value
    dropped = []
    if any(k.startswith(BACKBONE_PREFIX) for k in stripped):  # an mm model: keep its backbone
        dropped += [k for k in stripped if not k.startswith(BACKBONE_PREFIX)]
        stripped = {k[len(BACKBONE_PREFIX):]: v for k, v in stripped.items()
                    if k.startswith(BACKBONE_PREFIX)}
    dropped += [k for k in stripped if CLASSIFIER_KEY.match(k)]
    return {k: v for k, v in stripped.items() if not CLASSIFIER_KEY.match(k)}, dropped


# ---------------------------------------------------------------- rpb resize
def resize_rpb(rpb: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a relative position bias [heads, 2k-1, 2k-1] to ``size``."""
    resized = F.interpolate(rpb[None].float(), size=size, mode='bicubic',
                            align_corners=False)
    return resized[0].to(rpb.dtype)


def _resize_rpbs(state_dict: StateDict, model_state: StateDict) -> List[tuple]:
    resized = []
    for key, value in state_dict.items():
        target = model_state.get(key)
        if (key.endswith('attn.rpb') and target is not None and value.dim() == 3
                and value.shape[0] == target.shape[0] and value.shape != target.shape):
            state_dict[key] = resize_rpb(value, tuple(target.shape[1:]))
            resized.append((key, tuple(value.shape), tuple(target.shape)))
    return resized


# ---------------------------------------------------------------- the report
@dataclass
class LoadReport:
    source: str = '<state_dict>'
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Shape, Shape]] = field(default_factory=list)
    resized: List[Tuple[str, Shape, Shape]] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)

    @property
    def unexpectedly_missing(self) -> List[str]:
        return [k for k in self.missing if not OPTIONAL_KEY.match(k)]

    @property
    def ok(self) -> bool:
        return not (self.unexpectedly_missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        lines = [f'Loaded {len(self.loaded)} tensors from {self.source}.']
        if self.dropped:
            lines.append(f'Dropped {len(self.dropped)} keys not used by the backbone: '
                         f'{_short(self.dropped)}')
        for key, old, new in self.resized:
            lines.append(f'Resized {key} bicubically from {list(old)} to {list(new)} '
                         f'(different kernel size).')
        expected = [k for k in self.missing if OPTIONAL_KEY.match(k)]
        if expected:
            lines.append(f'Missing keys, expected (output norms initialised from '
                         f'scratch): {expected}')
        if self.unexpectedly_missing:
            lines.append(f'Missing keys: {self.unexpectedly_missing}')
        if self.unexpected:
            lines.append(f'Unexpected keys: {self.unexpected}')
        for key, in_ckpt, in_model in self.mismatched:
            lines.append(f'Shape mismatch: {key} is {list(in_ckpt)} in the checkpoint, '
                         f'{list(in_model)} in the model.')
        if self.ok:
            lines.append('All backbone weights matched.')
        return '\n'.join(lines)


def _short(keys: List[str], limit: int = 8) -> str:
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


# ---------------------------------------------------------------- loading
def load_backbone_state_dict(model: nn.Module, state_dict: StateDict,
                             strict: bool = True, source: str = '<state_dict>',
                             logger: Optional[str] = 'current') -> LoadReport:
    """Load a (raw or mm) state dict into a backbone and log the report.

    With ``strict`` a key other than ``norm{i}`` missing, an unexpected key or a shape
    mismatch raises CheckpointLoadError before the model is touched; otherwise the
    mismatched tensors are skipped.
    """
    state_dict, dropped = to_backbone_keys(state_dict)
    model_state = model.state_dict()
    report = LoadReport(source=source, dropped=dropped,
                        resized=_resize_rpbs(state_dict, model_state))
    for key, value in state_dict.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif value.shape != model_state[key].shape:
            report.mismatched.append((key, tuple(value.shape),
                                      tuple(model_state[key].shape)))
        else:
            report.loaded.append(key)
    report.missing = [k for k in model_state if k not in state_dict]
    if strict and not report.ok:
        raise CheckpointLoadError(f'the checkpoint does not fit {type(model).__name__} '
                                  f'(pass strict=False to skip the mismatches):\n'
                                  f'{report.format()}')
    model.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    print_log(report.format(), logger=logger,
              level=logging.INFO if report.ok else logging.WARNING)
    return report


def load_pretrained(model: nn.Module, filename: str, strict: bool = True,
                    logger: Optional[str] = 'current',
                    prefix: Optional[str] = None) -> LoadReport:
    """Read ``filename`` (upstream or mm checkpoint) and load it into ``model``; with
    ``prefix`` (as in mmengine's Pretrained init), only the keys under it, prefix
    removed."""
    state_dict = extract_state_dict(read_checkpoint(filename))
    if prefix:
        state_dict = select_prefix(state_dict, prefix, filename)
    return load_backbone_state_dict(model, state_dict, strict, source=filename,
                                    logger=logger)


def select_prefix(state_dict: StateDict, prefix: str, source: str) -> StateDict:
    """The tensors whose keys (after a 'module.' wrapper) start with ``prefix``, without it."""
    selected = {}
    for key, value in state_dict.items():
        for wrapper in WRAPPER_PREFIXES:
            key = key[len(wrapper):] if key.startswith(wrapper) else key
        if key.startswith(prefix):
            selected[key[len(prefix):]] = value
    if not selected:
        raise CheckpointLoadError(f'no key of {source} starts with prefix {prefix!r} '
                                  f'(its keys begin: {_short(sorted(state_dict), 4)})')
    return selected


# ---------------------------------------------------------------- conversion
def infer_arch(state_dict: StateDict) -> dict:
    """NAT constructor arguments (embed_dims, depths, num_heads, mlp_ratio,
    layer_scale, kernel_size) read off the shapes of a backbone state dict."""
    block = re.compile(r'^levels\.(\d+)\.blocks\.(\d+)\.')
    depths: Dict[int, int] = {}
    for key in state_dict:
        match = block.match(key)
        if match:
            level, index = int(match[1]), int(match[2])
            depths[level] = max(depths.get(level, 0), index + 1)
    if not depths or 'patch_embed.proj.1.weight' not in state_dict:
        raise CheckpointLoadError('not a NAT/DiNAT state dict: no patch_embed / levels keys')
    levels = range(len(depths))
    embed_dims = state_dict['patch_embed.proj.1.weight'].shape[0]
    rpbs = [state_dict[f'levels.{i}.blocks.0.attn.rpb'] for i in levels]
    hidden = state_dict['levels.0.blocks.0.mlp.fc1.weight'].shape[0]
    return dict(arch=None, embed_dims=embed_dims, depths=[depths[i] for i in levels],
                num_heads=[rpb.shape[0] for rpb in rpbs], mlp_ratio=hidden / embed_dims,
                layer_scale=1e-5 if 'levels.0.blocks.0.gamma1' in state_dict else None,
                kernel_size=(rpbs[0].shape[-1] + 1) // 2)


def to_mm_checkpoint(model: nn.Module, report: LoadReport,
                     meta: Optional[dict] = None) -> dict:
    """An mm-style checkpoint holding the tensors ``report`` says were loaded, under
    'backbone.' (load it with init_cfg Pretrained or mm's load_from)."""
    state = model.state_dict()
    return dict(meta=dict(meta or {}),
                state_dict={BACKBONE_PREFIX + k: state[k].clone() for k in report.loaded})
