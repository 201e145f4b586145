import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the command-line scripts, importable as modules by their tests (compare_runs, average_checkpoints, ...)
sys.path.insert(0, os.path.join(REPO, "scripts"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the long soak tests too (make test-slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak run, only with --run-slow (make test-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="soak test: run with `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
