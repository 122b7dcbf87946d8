"""Run config validation: impossible values are refused by name, before anything is built; every recipe passes."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from diffax.train.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.digits import get_config  # noqa: E402


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_every_recipe_is_valid(recipe):
    config = importlib.import_module(f"configs.{recipe}").get_config()
    # A study file (configs/scaling_digits.py, ...) is not a run config: it holds the run configs it trains.
    runs = [config] if "model" in config else [v for v in config.values() if hasattr(v, "keys") and "model" in v]
    assert runs, f"configs/{recipe}.py holds no run config (a block with 'model')"
    for run in runs:
        validate_config(run)


@pytest.mark.parametrize("key, value, allowed", [
    ("train.learning_rate", 0.0, "> 0"),
    ("train.learning_rate", -1e-3, "> 0"),
    ("train.learning_rate", float("nan"), "> 0"),
    ("train.label_dropout", 1.5, "in [0, 1]"),
    ("train.label_dropout", -0.1, "in [0, 1]"),
    ("train.ema_decay", 1.001, "in [0, 1]"),
    ("train.grad_accum_steps", 0, ">= 1"),
    ("train.keep_checkpoints", 0, ">= 1"),
    ("train.warmup_steps", -1, ">= 0"),
    ("train.grad_clip", -1.0, ">= 0"),
    ("train.log_every", 0, ">= 1"),
    ("train.checkpoint_every", 0, ">= 1"),
    ("train.steps", 0, ">= 1"),
    ("train.batch_size", 0, ">= 1"),
    ("train.adam_b1", 1.0, "in [0, 1)"),
    ("train.adam_b2", -0.5, "in [0, 1)"),
    ("train.adam_eps", 0.0, "> 0"),
    ("train.weight_decay", -1e-4, ">= 0"),
    ("train.peak_flops", -1.0, ">= 0"),
    ("train.sample_every", -1, ">= 0"),
    ("sample.steps", 0, ">= 1"),
    ("data.image_size", 0, ">= 1"),
    ("data.channels", 2, "1 or 3"),
    ("diffusion.num_train_timesteps", 1, ">= 2"),
    ("diffusion.snr_gamma", -5.0, ">= 0"),
])
def test_impossible_value_is_refused_by_name(key, value, allowed):
    config = get_config()
    block, name = key.split(".")
    config[block][name] = value
    with pytest.raises(ValueError, match=re.escape(f"config key '{key}' must be {allowed}") + ".*, got "
                       + re.escape(repr(value))):
        validate_config(config)


@pytest.mark.parametrize("start, end", [(0.0, 0.02), (0.02, 0.0001), (1e-4, 1.0)])
def test_beta_range_is_checked_where_the_schedule_uses_it(start, end):
    config = get_config()
    config.diffusion.beta_start, config.diffusion.beta_end = start, end
    config.diffusion.beta_schedule = "squaredcos_cap_v2"  # ignores both
    validate_config(config)
    config.diffusion.beta_schedule = "linear"
    with pytest.raises(ValueError, match=r"'diffusion.beta_start' and 'diffusion.beta_end' must satisfy "
                                         r"0 < beta_start < beta_end < 1 for the 'linear' schedule"):
        validate_config(config)


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                           f"--workdir={tmp_path / 'run'}", *overrides], capture_output=True, text=True,
                          cwd=tmp_path)


def test_missing_config_file_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config=nope.py", f"--workdir={tmp_path}",
                             "--config.train.steps=3"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot load the config file: "), result.stderr
    assert "No such file or directory: 'nope.py'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=5", "error: unknown config key 'train.stepz' (--config.train.stepz=5); "
                               "did you mean 'train.steps'?"),
    ("--config.trian.steps=5", "error: unknown config key 'trian' (--config.trian.steps=5); did you mean 'train'?"),
    ("--config.train.steps=abc", "error: config key 'train.steps' (--config.train.steps=abc): "
                                 "invalid literal for int() with base 10: 'abc'"),
    ("--config.train.keep_checkpoints=0", "error: config key 'train.keep_checkpoints' must be >= 1, got 0"),
])
def test_bad_override_is_one_line(tmp_path, override, message):
    """Unknown keys and unparsable values fail while absl parses the flags, impossible values in
    validate_config: each is one line on stderr and exit status 1, before the workdir's checkpoints are
    touched (keep_checkpoints=0 used to let Orbax delete every one of them)."""
    saved = tmp_path / "run" / "checkpoints" / "3"
    saved.mkdir(parents=True)
    (saved / "_CHECKPOINT_METADATA").write_text("{}")
    result = _train(tmp_path, override)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["3", "_CHECKPOINT_METADATA", "checkpoints"]
