#!/usr/bin/env python
"""Evaluate a trained NAT / DiNAT detector (mmdet) or segmentor (mmseg).

The task is taken from the config's ``default_scope``. Flags follow mmdet's and mmseg's
tools/test.py; ``--out`` means: detection, a .pkl file of raw predictions; segmentation,
a folder for the predicted label maps (PNG).

    python tools/test.py configs/detection/nat_tiny_maskrcnn.py ckpt.pth
    python tools/test.py CONFIG CKPT --show-dir vis --metrics-out metrics.json
"""
import argparse
import json
import os
import os.path as osp

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (adapt_to_cpu, add_cfg_options, add_launcher_args, add_repo_to_pythonpath,
                     build_runner, config_scope, end_distributed_process, load_config,
                     parse_launcher_args, skip_backbone_init)
from _data_check import require_datasets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (evaluate) a NAT/DiNAT detector (mmdet) or segmentor (mmseg).',
        epilog='The task (mmdet or mmseg) is taken from the config\'s default_scope.')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation logs '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--out', type=str,
                        help='detection: dump predictions to this .pkl file; '
                        'segmentation: write predicted label maps into this folder')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save images with predictions drawn into '
                        'this folder; as in mmdet\'s and mmseg\'s own test.py, a relative '
                        'path is inside the work dir\'s timestamped run folder for '
                        'detection, and relative to the current directory for '
                        'segmentation (images under DIR/vis_data/vis_image)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='with --show: seconds each image is shown')
    parser.add_argument('--metrics-out', type=str,
                        help='also write the final metrics to this JSON file')
    add_cfg_options(parser)
    add_launcher_args(parser)
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    return parse_launcher_args(parser, argv)


def trigger_visualization_hook(cfg, args):
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError('--show / --show-dir need a visualization hook in '
                           'default_hooks (DetVisualizationHook / SegVisualizationHook)')
    hook = default_hooks['visualization']
    hook['draw'] = True
    hook['interval'] = 1
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if config_scope(cfg) == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir
    return cfg


def _has_mask_head(model_cfg) -> bool:
    roi_head = model_cfg.get('roi_head') or {}
    return bool(roi_head.get('mask_head')) or bool(model_cfg.get('mask_head'))


def setup_tta(cfg, scope):
    from copy import deepcopy

    from mmengine.config import ConfigDict
    if scope == 'mmdet' and _has_mask_head(cfg.model):
        # mmdet 3.3's DetTTAModel asserts on masks, after the whole model has run
        raise SystemExit('--tta: mmdet 3.3 has no test-time augmentation for instance '
                         'segmentation, and this config predicts masks (a mask head); '
                         'test without --tta')
    if scope == 'mmdet':
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='DetTTAModel', tta_cfg=dict(
                nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            test_data_cfg = cfg.test_dataloader.dataset
            while 'dataset' in test_data_cfg:
                test_data_cfg = test_data_cfg['dataset']
            cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
            cfg.tta_pipeline[-1] = dict(type='TestTimeAug', transforms=[
                [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                [dict(type='PackDetInputs', meta_keys=(
                    'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                    'flip', 'flip_direction'))]])
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def _to_json(value):
    """Metric values are Python or numpy scalars (mmseg: numpy.float32)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def main(argv=None):
    args = parse_args(argv)
    add_repo_to_pythonpath()
    cfg, scope = load_config(args)
    cfg.load_from = args.checkpoint
    skip_backbone_init(cfg)  # testing never needs pretrained backbone weights

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        setup_tta(cfg, scope)
    if args.out is not None and scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    adapt_to_cpu(cfg, args.launcher, logger_print=lambda *a: None)
    require_datasets(cfg, ['test'], scope)
    # argument errors before the runner is built (a minute with real data)
    if '://' not in args.checkpoint and not osp.isfile(osp.expanduser(args.checkpoint)):
        raise SystemExit(f'checkpoint {args.checkpoint!r} not found')  # (a URL is mmengine's)
    if args.out is not None and scope == 'mmdet' and not args.out.endswith(
            ('.pkl', '.pickle')):
        raise SystemExit('--out for detection must be a .pkl file')

    runner = build_runner(cfg)

    if args.out is not None and scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))

    metrics = runner.test()
    if args.metrics_out and runner.rank == 0:
        os.makedirs(osp.dirname(osp.abspath(args.metrics_out)), exist_ok=True)
        with open(args.metrics_out, 'w') as f:
            json.dump({k: _to_json(v) for k, v in metrics.items()}, f, indent=2)
    return metrics


if __name__ == '__main__':
    main()
    end_distributed_process()
