"""Importing the scripts of tools/ in tests (they are not a package)."""
import importlib
import os.path as osp
import sys

TOOLS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools')


def import_tool(name: str):
    """tools/<name>.py as a module. tools/ is on sys.path only during the import (it holds
    a module named ``test``); removed by value, since tools/_common.py may insert the
    repository root in front of it."""
    sys.path.insert(0, TOOLS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(TOOLS)
