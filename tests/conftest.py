"""Test setup: make the tiny-model helpers importable; `--device cuda:0` runs the mesh tests on a GPU."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the sliced-execution, stage-server and coordinator mesh tests "
                          "and their Hugging Face references (default: cpu; e.g. cuda:0)")


def pytest_configure(config):
    import tiny_models

    tiny_models.DEVICE = config.getoption("--device")
