"""Before a run: are the config's data sets where it says they are? (not a public API)

Without this, a missing COCO / ADE20K surfaces as a FileNotFoundError deep in a dataset's
constructor after the model is built. ``require_datasets`` names every missing path, the
config key it came from and what to do instead, and exits before anything is built.

Paths are resolved as mmengine's BaseDataset resolves them: ``ann_file`` and every
``data_prefix`` entry relative to ``data_root``. Data on a remote storage backend
(``backend_args`` set, or a ``scheme://`` path) is not checked.
"""
import os.path as osp

# What a data set wrapper (RepeatDataset, ClassBalancedDataset, ConcatDataset,
# MultiImageMixDataset) calls the data sets it wraps.
WRAPPED_KEYS = ('dataset', 'datasets')
# The data_prefix entries that are folders of images or label maps in mmdet's and mmseg's
# data sets (others, in custom data sets, may mean something else: left alone).
FOLDER_PREFIXES = ('img', 'img_path', 'seg', 'seg_map_path')

DEMO_HINT = {
    'mmdet': ('make demo  (trains configs/detection/nat_mini_maskrcnn_demo.py on built-in '
              'synthetic data)'),
    'mmseg': ('DEMO_SEG=1 bash tools/run_demo.sh  (also trains '
              'configs/segmentation/nat_mini_upernet_demo.py on built-in synthetic data)'),
}


def _is_local(path) -> bool:
    return isinstance(path, str) and bool(path) and '://' not in path


def _resolve(path: str, data_root) -> str:
    if data_root and not osp.isabs(path):
        return osp.join(data_root, path)
    return path


def _dataset_paths(dataset, key: str):
    """(dataset's config key, field, path) of every local file or folder a dataset config
    reads."""
    if not isinstance(dataset, dict):
        return
    for wrapped in WRAPPED_KEYS:
        inner = dataset.get(wrapped)
        if isinstance(inner, dict):
            yield from _dataset_paths(inner, f'{key}.{wrapped}')
        elif isinstance(inner, (list, tuple)):
            for i, item in enumerate(inner):
                yield from _dataset_paths(item, f'{key}.{wrapped}.{i}')
    if dataset.get('backend_args') is not None:
        return
    data_root = dataset.get('data_root')
    if _is_local(dataset.get('ann_file')):
        yield key, 'ann_file', _resolve(dataset['ann_file'], data_root)
    for name, prefix in (dataset.get('data_prefix') or {}).items():
        if name not in FOLDER_PREFIXES:
            continue
        if _is_local(prefix):
            yield key, f'data_prefix.{name}', _resolve(prefix, data_root)
        elif prefix == '' and _is_local(data_root):
            yield key, 'data_root', data_root


def _evaluator_paths(evaluator, key: str):
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for i, metric in enumerate(metrics):
        if isinstance(metric, dict) and _is_local(metric.get('ann_file')) \
                and metric.get('backend_args') is None:
            yield key if len(metrics) == 1 else f'{key}.{i}', 'ann_file', metric['ann_file']


def missing_dataset_paths(cfg, phases):
    """[(owner, field, path)] of the paths that the given phases ('train', 'val', 'test')
    read and that do not exist, each path once; owner is the config key of the dataset or
    evaluator, field the key within it."""
    missing, seen = [], set()
    for phase in phases:
        loader = cfg.get(f'{phase}_dataloader')
        if not loader:
            continue
        found = list(_dataset_paths(loader.get('dataset'), f'{phase}_dataloader.dataset'))
        found += list(_evaluator_paths(cfg.get(f'{phase}_evaluator'), f'{phase}_evaluator'))
        for owner, field, path in found:
            if path not in seen and not osp.exists(path):
                seen.add(path)
                missing.append((owner, field, path))
    return missing


def require_datasets(cfg, phases, scope: str) -> None:
    """Exit with a message naming each missing data path and the ways out."""
    missing = missing_dataset_paths(cfg, phases)
    if not missing:
        return
    lines = ['nat_mm tools: the data this config reads is not there:']
    lines += [f'  {path}   ({owner}.{field})' for owner, field, path in missing]
    datasets = [owner for owner, _, _ in missing if '_dataloader.' in owner]
    lines.append('Put the data set there (or link it there: ln -s /path/to/dataset '
                 '<data_root>), or point the config at it with --cfg-options'
                 + (f', e.g. {datasets[0]}.data_root=/path/to/dataset/' if datasets else '')
                 + ' (each dataloader and evaluator listed above has its own key).')
    lines.append(f'To try NAT without the data set: {DEMO_HINT[scope]}')
    raise SystemExit('\n'.join(lines))
