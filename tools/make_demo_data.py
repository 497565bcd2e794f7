#!/usr/bin/env python
"""Write the small synthetic data sets of the out-of-the-box demo (no download needed).

* ``<out>/coco``: instance segmentation in COCO format. Images of a few shape classes
  (circle, square, triangle) in random colours, sizes and rotations on a textured
  background, with boxes and exact polygon masks (the pixels are drawn from the same
  polygons). Layout::

      <out>/coco/annotations/instances_{train,val}.json
      <out>/coco/{train,val}/000000.jpg ...

* ``<out>/ade``: semantic segmentation in the ADE20K layout (``reduce_zero_label``
  convention: 0 = unlabeled, 1 = background, 2.. = shapes)::

      <out>/ade/images/{training,validation}/000000.jpg ...
      <out>/ade/annotations/{training,validation}/000000.png ...

Everything is drawn from a fixed seed, so the same arguments always write the same
files. Existing data written with the same arguments is kept (use --force to rewrite).

    python tools/make_demo_data.py                # both data sets under data/demo
    python tools/make_demo_data.py --num-train 64 --num-val 16 --out /tmp/demo
"""
import argparse
import json
import math
import os
import os.path as osp
import shutil

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='data/demo', help='output folder (default: data/demo)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    p.add_argument('--num-train', type=int, default=400,
                   help='detection training images (default: 400)')
    p.add_argument('--num-val', type=int, default=50,
                   help='detection validation images (default: 50)')
    p.add_argument('--img-size', type=int, default=160,
                   help='detection image side in pixels (default: 160)')
    p.add_argument('--seg-num-train', type=int, default=200,
                   help='segmentation training images (default: 200)')
    p.add_argument('--seg-num-val', type=int, default=40,
                   help='segmentation validation images (default: 40)')
    p.add_argument('--seg-img-size', type=int, default=128,
                   help='segmentation image side in pixels (default: 128)')
    p.add_argument('--only', choices=['det', 'seg'], default=None,
                   help='write only one of the two data sets')
    p.add_argument('--force', action='store_true', help='rewrite existing data')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- drawing
def background(rng, size):
    """A smooth random colour gradient plus mild noise (so the task is not trivial)."""
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_polygon(rng, cls, cx, cy, r):
    """Polygon (N x 2 float, x/y) of a shape of class ``cls`` with circumradius ``r``."""
    rot = rng.uniform(0, 2 * math.pi)
    if cls == 'circle':
        n, rot = 32, 0.0
    elif cls == 'square':
        n = 4
    else:
        n = 3
    a = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def contrasting_colour(rng, img, poly):
    """A random colour that differs clearly from the background under the shape."""
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    mean = img[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1].reshape(-1, 3).mean(0)
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - mean).sum() > 180:
            return colour
    return 255 - mean


def make_scene(rng, size, max_objects, min_r, max_r):
    """Draw one image; returns (image BGR uint8, list of (class index, polygon))."""
    img = background(rng, size)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(30):
            cls = int(rng.integers(len(CLASSES)))
            r = rng.uniform(min_r, max_r)
            cx, cy = rng.uniform(r, size - r, 2)
            poly = shape_polygon(rng, CLASSES[cls], cx, cy, r)
            box = np.concatenate([poly.min(0), poly.max(0)])
            # no overlap (with a 2 px margin), so every mask is exactly its polygon
            if all(box[0] > b[2] + 2 or box[2] < b[0] - 2 or box[1] > b[3] + 2
                   or box[3] < b[1] - 2 for b in boxes):
                break
        else:
            continue
        colour = contrasting_colour(rng, img, poly)
        pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits, anti-aliased
        cv2.fillPoly(img, [pts], tuple(float(c) for c in colour), lineType=cv2.LINE_AA,
                     shift=4)
        objects.append((cls, poly))
        boxes.append(box)
    return img, objects


# ----------------------------------------------------------------------------- writers
def write_coco(out, split, num, size, rng):
    img_dir = osp.join(out, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num):
        img, objects = make_scene(rng, size, max_objects=4, min_r=0.09 * size,
                                  max_r=0.22 * size)
        name = f'{i:06d}.jpg'
        cv2.imwrite(osp.join(img_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
        for cls, poly in objects:
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
            annotations.append(dict(
                id=ann_id, image_id=i + 1, category_id=cls + 1, iscrowd=0,
                bbox=[round(float(x0), 2), round(float(y0), 2),
                      round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                area=float(mask.sum()),
                segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]]))
            ann_id += 1
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)]
    coco = dict(info=dict(description=f'nat_mm synthetic shapes ({split})'),
                images=images, annotations=annotations, categories=categories)
    os.makedirs(osp.join(out, 'annotations'), exist_ok=True)
    with open(osp.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return len(images), len(annotations)


def write_ade(out, split, num, size, rng):
    img_dir = osp.join(out, 'images', split)
    ann_dir = osp.join(out, 'annotations', split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    for i in range(num):
        img, objects = make_scene(rng, size, max_objects=5, min_r=0.08 * size,
                                  max_r=0.25 * size)
        label = np.ones((size, size), np.uint8)  # 1 = background (0 stays "unlabeled")
        for cls, poly in objects:
            cv2.fillPoly(label, [np.round(poly * 16).astype(np.int32)], cls + 2, shift=4)
        cv2.imwrite(osp.join(img_dir, f'{i:06d}.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(osp.join(ann_dir, f'{i:06d}.png'), label)
    return num


def _fresh(folder, stamp, force):
    """True when ``folder`` must be (re)written; clears it then. ``stamp`` holds JSON types
    only (lists, not tuples), so that it compares equal to itself read back."""
    stamp_file = osp.join(folder, 'demo_data.json')
    if not force and osp.isfile(stamp_file):
        with open(stamp_file) as f:
            if json.load(f) == stamp:
                return False
    if osp.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.only in (None, 'det'):
        folder = osp.join(args.out, 'coco')
        stamp = dict(seed=args.seed, train=args.num_train, val=args.num_val,
                     size=args.img_size, classes=list(CLASSES), version=1)
        if _fresh(folder, stamp, args.force):
            rng = np.random.default_rng(args.seed)
            n_tr = write_coco(folder, 'train', args.num_train, args.img_size, rng)
            n_va = write_coco(folder, 'val', args.num_val, args.img_size, rng)
            with open(osp.join(folder, 'demo_data.json'), 'w') as f:
                json.dump(stamp, f)
            print(f'wrote {folder}: train {n_tr[0]} images / {n_tr[1]} objects, '
                  f'val {n_va[0]} images / {n_va[1]} objects, '
                  f'{args.img_size}x{args.img_size}, classes {", ".join(CLASSES)}')
        else:
            print(f'{folder} is up to date')
    if args.only in (None, 'seg'):
        folder = osp.join(args.out, 'ade')
        stamp = dict(seed=args.seed, train=args.seg_num_train, val=args.seg_num_val,
                     size=args.seg_img_size, classes=list(SEG_CLASSES), version=1)
        if _fresh(folder, stamp, args.force):
            rng = np.random.default_rng(args.seed + 1)
            write_ade(folder, 'training', args.seg_num_train, args.seg_img_size, rng)
            write_ade(folder, 'validation', args.seg_num_val, args.seg_img_size, rng)
            with open(osp.join(folder, 'demo_data.json'), 'w') as f:
                json.dump(stamp, f)
            print(f'wrote {folder}: {args.seg_num_train} training / {args.seg_num_val} '
                  f'validation images, {args.seg_img_size}x{args.seg_img_size}, '
                  f'classes {", ".join(SEG_CLASSES)}')
        else:
            print(f'{folder} is up to date')


if __name__ == '__main__':
    main()
