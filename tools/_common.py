"""Helpers shared by the scripts in tools/ (not a public API).

The scripts run from a source checkout without installing nat_mm: the repository root
is put on ``sys.path`` so that ``custom_imports = dict(imports=['nat_mm'])`` in the
configs resolves.
"""
import os
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SCOPES = ('mmdet', 'mmseg')


def add_repo_to_pythonpath() -> None:
    """Also for worker processes started by spawn (they re-import the config)."""
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if REPO_ROOT not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in paths if p])


def config_scope(cfg) -> str:
    """'mmdet' or 'mmseg', from the config's ``default_scope``."""
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'the config has default_scope={scope!r}; these tools handle '
                         f'{" and ".join(SCOPES)} configs')
    return scope


def register_scope(scope: str) -> None:
    """Import the task package's modules into its registries."""
    if scope == 'mmdet':
        from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)


def default_work_dir(config_path: str) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def add_launcher_args(parser) -> None:
    """--launcher, and the --local-rank that torch.distributed.launch passes (torchrun sets
    LOCAL_RANK instead); parse_launcher_args() exports it."""
    import argparse
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)


def parse_launcher_args(parser, argv=None):
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_runner(cfg):
    """mmengine's Runner, or the config's own runner_type."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def input_hw(shape, default):
    """(height, width) from a --shape of one or two ints (None: default)."""
    if shape is None:
        return tuple(default)
    return (shape[0], shape[0]) if len(shape) == 1 else tuple(shape[:2])


def skip_backbone_init(cfg) -> None:
    """Drop the backbone's pretrained init: the checkpoint (or nothing) provides weights."""
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None


def int_at_least(minimum: int, odd: bool = False):
    """An argparse type: an int >= minimum (and odd, if asked), else a usage error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an int') from None
        if value < minimum or (odd and value % 2 == 0):
            raise argparse.ArgumentTypeError(
                f'{value} is not {"an odd int" if odd else "an int"} >= {minimum}')
        return value
    return parse


def add_cfg_options(parser, example: str = '') -> None:
    """The --cfg-options argument every tool takes (mmengine's key=value overrides)."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs' + example)


def read_config(args):
    """args.config with args.cfg_options merged in."""
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def load_config(args):
    """The config of a train/test run with the command line applied: launcher,
    --cfg-options, the task scope's registries, and work_dir (CLI > config >
    ./work_dirs/<config name>). Returns (cfg, scope)."""
    cfg = read_config(args)
    cfg.launcher = args.launcher
    scope = config_scope(cfg)
    register_scope(scope)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(args.config)
    return cfg, scope


def accelerator_available() -> bool:
    from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                                 is_npu_available)
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def adapt_to_cpu(cfg, launcher: str, logger_print=print) -> None:
    """Make a GPU recipe run on a machine without an accelerator.

    * fp16 mixed precision (AmpOptimWrapper) needs a GPU: fall back to fp32.
    * Distributed runs use the gloo backend, and DDP wraps a CPU module
      (``device_ids=None``); mmengine's default passes ``device_ids=[LOCAL_RANK]``,
      which DDP refuses for CPU modules, and calls ``torch.cuda.set_device``.
    """
    if accelerator_available():
        return
    optim_wrapper = cfg.get('optim_wrapper', None)
    if optim_wrapper is not None and optim_wrapper.get('type') == 'AmpOptimWrapper':
        logger_print('nat_mm tools: no GPU, so fp16 mixed precision (AmpOptimWrapper) is '
                     'off: training in fp32 with OptimWrapper.')
        optim_wrapper.type = 'OptimWrapper'
        optim_wrapper.pop('loss_scale', None)
        optim_wrapper.pop('dtype', None)
    if launcher != 'none':
        cfg.setdefault('env_cfg', {})
        cfg.env_cfg.setdefault('dist_cfg', {})
        cfg.env_cfg.dist_cfg['backend'] = 'gloo'
        wrapper = cfg.get('model_wrapper_cfg', None) or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        wrapper['device_ids'] = None
        cfg.model_wrapper_cfg = wrapper
        if launcher == 'pytorch':
            init_cpu_process_group(cfg.env_cfg.dist_cfg)


def init_cpu_process_group(dist_cfg) -> None:
    """torchrun on CPU: init gloo ourselves (mmengine's init_dist needs CUDA)."""
    import datetime

    import torch.distributed as dist
    if dist.is_initialized():
        return
    kwargs = {}
    if dist_cfg.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    dist.init_process_group(backend='gloo', **kwargs)


def end_distributed_process() -> None:
    """End a distributed job's process once its work is done, skipping interpreter
    finalization. Finalization raced with gloo's worker threads: a worker releasing a
    finished broadcast (likely mmengine's metrics) decrefs a Python-owned tensor, needs the GIL,
    and a thread that asks for the GIL while the interpreter finalizes is force-unwound
    through a noexcept destructor: std::terminate, SIGABRT, exit code 1 after a complete
    run (core dump backtrace, 2026-12-07). Seen in 3 of 8 two-process CPU runs; destroying
    the process group alone left 1 in 9 (its worker threads outlived it: a reference,
    probably DDP's, kept it alive). No-op outside distributed runs."""
    import logging

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # every rank is through its last collective
    dist.destroy_process_group()
    logging.shutdown()  # what finalization would have flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build_model_from_cfg(cfg, checkpoint=None, device='cpu'):
    """Build ``cfg.model`` in its scope (backbone pretrained init skipped), optionally
    load a checkpoint, SyncBN reverted to BN, in eval mode on ``device``."""
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    scope = config_scope(cfg)
    register_scope(scope)
    init_default_scope(scope)
    skip_backbone_init(cfg)
    model = MODELS.build(cfg.model)
    model = revert_sync_batchnorm(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model.cfg = cfg
    return model.to(device).eval()


def dummy_batch(scope, height, width, batch_size=1, seed=0):
    """A batch for ``model.test_step``: random uint8 images with the metainfo of an
    image that needed no resizing (``height`` x ``width``)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, height, width), generator=g,
                                    dtype=torch.uint8))
        meta = dict(img_shape=(height, width), ori_shape=(height, width),
                    pad_shape=(height, width), scale_factor=(1.0, 1.0),
                    img_path='dummy.jpg')
        if scope == 'mmdet':
            from mmdet.structures import DetDataSample
            samples.append(DetDataSample(metainfo=meta))
        else:
            from mmseg.structures import SegDataSample
            samples.append(SegDataSample(metainfo=meta))
    return dict(inputs=inputs, data_samples=samples)
