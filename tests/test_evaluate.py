"""The training loop's evaluation hook and grids (diffax/train/evaluate.py) on the pixel digits model: the
metric logged at train.eval_every, and the config checks that run before training. The latent and text
paths are exercised in tests/test_latent_cache.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffax import parallel
from diffax.data import make_source
from diffax.models import build_model
from diffax.train.evaluate import Sampler, check_eval, eval_prompts, takes_text
from diffax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import tiny_config  # noqa: E402


def _sampler(config) -> Sampler:
    mesh, rules = parallel.mesh_from_config(config.mesh)
    return Sampler(build_model(config.model), config, mesh, rules, make_source(config.data))


def test_eval_config_checks():
    config = tiny_config()
    sampler = _sampler(config)
    assert not takes_text(sampler.model.config)
    config.eval.kind = "digits_accuracy"
    check_eval(config, sampler)  # a class-conditional model: fine
    config.eval.kind = "inception_score"
    with pytest.raises(ValueError, match="config key 'eval.kind' must be one of"):
        check_eval(config, sampler)
    config.eval.kind, config.train.eval_every = "", 10
    with pytest.raises(ValueError, match="config key 'train.eval_every' is 10 but eval.kind is empty"):
        check_eval(config, sampler)
    config.eval.kind = "digits_accuracy"
    config.model.num_class_embeds = None  # unconditional: nothing to ask for a digit with
    with pytest.raises(ValueError, match="'digits_accuracy', but the model takes no labels or prompts"):
        check_eval(config, _sampler(config))
    config.eval.kind = "digits_fid"
    check_eval(config, _sampler(config))
    # A text model is asked with the cache's caption template (here the default one).
    assert eval_prompts(sampler, [7, 0]) == ["a handwritten seven", "a handwritten zero"]


def test_fid_logged_at_eval_every_and_the_grid_written(tmp_path):
    config = tiny_config(steps=2)
    config.train.update(dict(eval_every=2, sample_every=2, checkpoint_every=2))
    config.eval.update(dict(kind="digits_fid", num_samples=100))  # the class grid's count: one program
    train_and_evaluate(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (fid,) = [line for line in lines if "digits_fid" in line]
    # Two steps from random weights: far from the real digits (their own FID is ~0), and finite.
    assert fid["step"] == 2 and 1.0 < fid["digits_fid"] < 1e6
    assert (tmp_path / "samples" / "step_000002.png").is_file()
    events = list((tmp_path / "tensorboard").glob("events*"))
    assert events and b"eval/digits_fid" in events[0].read_bytes()
