#!/usr/bin/env python
"""Run a trained detector or segmentor on one image and save a picture of the result.

Detection configs (mmdet): boxes, class names, scores and instance masks are drawn.
Segmentation configs (mmseg): the predicted label map is blended over the image.

    python tools/image_demo.py IMAGE CONFIG CHECKPOINT --out-file pred.png
    python tools/image_demo.py data/demo/coco/val/000000.jpg \
        configs/detection/nat_mini_maskrcnn_demo.py work_dirs/demo/det/epoch_8.pth
"""
import argparse
import os
import os.path as osp

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (add_cfg_options, add_repo_to_pythonpath, config_scope, read_config,
                     register_scope, skip_backbone_init)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Draw the predictions of a NAT/DiNAT detector or segmentor on an '
        'image and save it as a PNG.')
    p.add_argument('img', help='image file')
    p.add_argument('config', help='config file (detection or segmentation)')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--out-file', default='demo_pred.png', help='output picture '
                   '(default: demo_pred.png)')
    p.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='detection: draw boxes scoring at least this (default: 0.3)')
    p.add_argument('--opacity', type=float, default=0.5,
                   help='segmentation: opacity of the label overlay (default: 0.5)')
    p.add_argument('--upscale', type=int, default=1,
                   help='draw on an N-times enlarged copy of the image (predictions are '
                   'made on the original; useful for small images), default 1')
    add_cfg_options(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    add_repo_to_pythonpath()
    import mmcv
    from mmengine.registry import init_default_scope

    cfg = read_config(args)
    scope = config_scope(cfg)
    register_scope(scope)
    init_default_scope(scope)
    skip_backbone_init(cfg)
    os.makedirs(osp.dirname(osp.abspath(args.out_file)), exist_ok=True)

    import torch.nn.functional as F
    image = mmcv.imconvert(mmcv.imread(args.img), 'bgr', 'rgb')
    up = max(int(args.upscale), 1)
    if up > 1:
        image = mmcv.imrescale(image, up, interpolation='bicubic')

    def enlarge(mask):  # [N, H, W] -> [N, up*H, up*W], nearest
        if mask.numel() == 0:
            return mask.new_zeros((mask.shape[0], mask.shape[1] * up, mask.shape[2] * up))
        return F.interpolate(mask[None].float(), scale_factor=up,
                             mode='nearest')[0].to(mask.dtype)
    if scope == 'mmdet':
        from mmdet.apis import inference_detector, init_detector
        from mmdet.registry import VISUALIZERS
        model = init_detector(cfg, args.checkpoint, device=args.device)
        result = inference_detector(model, args.img)
        if up > 1:
            result.pred_instances.bboxes = result.pred_instances.bboxes * up
            if 'masks' in result.pred_instances:
                result.pred_instances.masks = enlarge(result.pred_instances.masks)
        visualizer = VISUALIZERS.build(model.cfg.visualizer)
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample(osp.basename(args.img), image, data_sample=result,
                                  draw_gt=False, pred_score_thr=args.score_thr,
                                  out_file=args.out_file)
        inst = result.pred_instances
        keep = inst.scores >= args.score_thr
        names = model.dataset_meta['classes']
        found = [f'{names[int(label)]} {float(score):.2f}'
                 for label, score in zip(inst.labels[keep], inst.scores[keep])]
        print(f'{len(found)} detections (score >= {args.score_thr}): '
              f'{", ".join(found) if found else "-"}')
    else:
        from mmseg.apis import inference_model, init_model
        from mmseg.registry import VISUALIZERS
        model = init_model(cfg, args.checkpoint, device=args.device)
        result = inference_model(model, args.img)
        if up > 1:
            from mmengine.structures import PixelData
            result.pred_sem_seg = PixelData(data=enlarge(result.pred_sem_seg.data))
        visualizer = VISUALIZERS.build(model.cfg.visualizer)
        visualizer.alpha = args.opacity
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample(osp.basename(args.img), image, data_sample=result,
                                  draw_gt=False, with_labels=True,
                                  out_file=args.out_file)
        labels = result.pred_sem_seg.data.unique().tolist()
        names = model.dataset_meta['classes']
        print('classes present: ' + ', '.join(names[i] for i in labels if i < len(names)))
    print(f'saved {args.out_file}')


if __name__ == '__main__':
    main()
