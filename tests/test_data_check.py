"""tools/_data_check.py: a config's missing data sets are named before anything is built."""
import os
import os.path as osp
import subprocess
import sys

import pytest

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmengine.config import Config  # noqa: E402
from tool_modules import TOOLS, import_tool  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
_data_check = import_tool('_data_check')
missing_dataset_paths, require_datasets = (_data_check.missing_dataset_paths,
                                           _data_check.require_datasets)

COCO_CFG = osp.join(REPO, 'configs', 'detection', 'nat_tiny_maskrcnn.py')
ADE_CFG = osp.join(REPO, 'configs', 'segmentation', 'nat_tiny_upernet.py')


def _make(root, paths):
    for path in paths:
        full = osp.join(root, path)
        if path.endswith('.json'):
            os.makedirs(osp.dirname(full), exist_ok=True)
            open(full, 'w').close()
        else:
            os.makedirs(full, exist_ok=True)


def test_coco_config_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's data_root is relative: data/coco/
    cfg = Config.fromfile(COCO_CFG)
    missing = missing_dataset_paths(cfg, ['train', 'val'])
    assert missing == [
        ('train_dataloader.dataset', 'ann_file',
         'data/coco/annotations/instances_train2017.json'),
        ('train_dataloader.dataset', 'data_prefix.img', 'data/coco/train2017/'),
        ('val_dataloader.dataset', 'ann_file', 'data/coco/annotations/instances_val2017.json'),
        ('val_dataloader.dataset', 'data_prefix.img', 'data/coco/val2017/'),
    ]  # the val evaluator's ann_file is the val set's: listed once
    _make(tmp_path, [p for _, _, p in missing])
    assert missing_dataset_paths(cfg, ['train', 'val', 'test']) == []


def test_coco_evaluator_annotation_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(COCO_CFG)
    _make(tmp_path, ['data/coco/annotations/instances_val2017.json', 'data/coco/val2017/'])
    cfg.test_evaluator.ann_file = 'elsewhere/instances_val2017.json'
    assert missing_dataset_paths(cfg, ['test']) == [
        ('test_evaluator', 'ann_file', 'elsewhere/instances_val2017.json')]


def test_ade_config_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(ADE_CFG)
    root = 'data/ade/ADEChallengeData2016'
    assert missing_dataset_paths(cfg, ['train']) == [
        ('train_dataloader.dataset', 'data_prefix.img_path', f'{root}/images/training'),
        ('train_dataloader.dataset', 'data_prefix.seg_map_path',
         f'{root}/annotations/training'),
    ]
    _make(tmp_path, [f'{root}/images/training', f'{root}/annotations/training'])
    assert missing_dataset_paths(cfg, ['train']) == []
    assert [p for _, _, p in missing_dataset_paths(cfg, ['val'])] == [
        f'{root}/images/validation', f'{root}/annotations/validation']


def test_wrappers_remote_data_and_other_prefixes(tmp_path):
    base = dict(type='CocoDataset', data_root=str(tmp_path), ann_file='a.json',
                data_prefix=dict(img='imgs/'))
    cfg = Config(dict(train_dataloader=dict(dataset=dict(
        type='ConcatDataset', datasets=[
            dict(type='RepeatDataset', times=2, dataset=base),
            dict(base, ann_file='b.json', backend_args=dict(backend='petrel')),
            dict(base, ann_file='s3://bucket/c.json', data_prefix=dict(img='s3://bucket/')),
            dict(base, ann_file=str(tmp_path / 'd.json'), data_prefix=dict(
                img='imgs/', caption='not-a-folder', seg_map_path='')),
        ]))))
    missing = missing_dataset_paths(cfg, ['train', 'val'])
    key = 'train_dataloader.dataset.datasets'
    assert missing == [
        (f'{key}.0.dataset', 'ann_file', osp.join(str(tmp_path), 'a.json')),
        (f'{key}.0.dataset', 'data_prefix.img', osp.join(str(tmp_path), 'imgs/')),
        (f'{key}.3', 'ann_file', str(tmp_path / 'd.json')),  # absolute: data_root unused
    ]  # a prefix of '' is data_root itself, which exists; imgs/ is listed once
    with pytest.raises(SystemExit) as err:
        require_datasets(cfg, ['train'], 'mmdet')
    message = str(err.value)
    assert 'a.json' in message and 'd.json' in message and 'make demo' in message
    assert f'{key}.0.dataset.data_root=' in message


def _tool(name, *args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, osp.join(TOOLS, name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_train_tool_names_the_missing_dataset(tmp_path):
    rc, out = _tool('train.py', COCO_CFG, '--work-dir', str(tmp_path / 'wd'), cwd=tmp_path)
    assert rc == 1, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    assert 'data/coco/annotations/instances_train2017.json' in out
    assert 'make demo' in out
    assert not osp.exists(tmp_path / 'wd' / 'last_checkpoint')


def test_test_tool_checks_the_test_set_only(tmp_path):
    rc, out = _tool('test.py', ADE_CFG, 'none.pth', '--work-dir', str(tmp_path / 'wd'),
                    cwd=tmp_path)
    assert rc == 1, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    assert 'images/validation' in out and 'images/training' not in out
    assert 'run_demo.sh' in out
