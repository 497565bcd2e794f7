"""Shared pytest setup: the ``slow`` marker and its opt-in switch.

Tests marked ``@pytest.mark.slow`` (minutes of runtime or many GiB of memory) are skipped
unless they are asked for, either by selecting them with ``-m slow`` (any ``-m``
expression that mentions ``slow``) or by setting ``NAT_MM_RUN_SLOW=1``::

    pytest tests -m slow                  # only the slow tests
    NAT_MM_RUN_SLOW=1 pytest tests        # everything
"""
import os

import pytest

SLOW_ENV = 'NAT_MM_RUN_SLOW'


def pytest_configure(config):
    config.addinivalue_line(
        'markers', f'slow: minutes of runtime or many GiB of memory; skipped unless '
                   f'selected with -m slow or {SLOW_ENV}=1')


def _slow_enabled(config) -> bool:
    if os.environ.get(SLOW_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return True
    return 'slow' in (config.getoption('markexpr', default='') or '')


def pytest_collection_modifyitems(config, items):
    if _slow_enabled(config):
        return
    skip = pytest.mark.skip(reason=f'slow test: run with -m slow or {SLOW_ENV}=1')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)
