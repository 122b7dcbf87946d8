"""The config files of configs/, loaded the way train.py loads them (by path, not as a package)."""
import importlib.util
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str, *args: str) -> ml_collections.ConfigDict:
    """`get_config(*args)` of configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)
