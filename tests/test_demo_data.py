"""tools/make_demo_data.py: the synthetic data sets are written once per set of arguments."""
import os
import os.path as osp

import pytest

pytest.importorskip('cv2')

from tool_modules import import_tool  # noqa: E402

make_demo_data = import_tool('make_demo_data')

TINY = ['--num-train', '2', '--num-val', '1', '--img-size', '48', '--seg-num-train', '2',
        '--seg-num-val', '1', '--seg-img-size', '32']


def _mtimes(root):
    return {osp.join(d, f): os.stat(osp.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_same_arguments_reuse_the_data(tmp_path, capsys):
    out = str(tmp_path / 'demo')
    make_demo_data.main(['--out', out] + TINY)
    assert capsys.readouterr().out.count('wrote') == 2
    written = _mtimes(out)
    assert any(p.endswith('.jpg') for p in written) and any(p.endswith('.png') for p in written)

    make_demo_data.main(['--out', out] + TINY)
    assert capsys.readouterr().out.count('is up to date') == 2
    assert _mtimes(out) == written

    make_demo_data.main(['--out', out, '--only', 'det', '--seed', '1'] + TINY)
    assert capsys.readouterr().out.count('wrote') == 1  # other arguments: rewritten
    make_demo_data.main(['--out', out, '--only', 'seg', '--force'] + TINY)
    assert capsys.readouterr().out.count('wrote') == 1
    now = _mtimes(out)
    assert set(now) == set(written)
    assert all(now[p] != written[p] for p in now if p.endswith(('.jpg', '.png')))
