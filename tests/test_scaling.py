"""The model-size study: the --quick command trains, measures, plots and resumes; the budget winners; the
per-width configs and the cost accounting."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffax.schedulers.names import scheduler_for
from diffax.studies import scaling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.scaling_digits import get_config  # noqa: E402

FIELDS = ("model", "params", "flops_per_eval", "sampler", "steps", "evals", "cost_flops", "fid", "accuracy")


def _run_quick(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffax.studies.scaling", "--config=configs/scaling_digits.py",
                           "--quick", f"--config.workdir={workdir}", *extra],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow  # the whole --quick study (about 50 s on 2 cores): `make test-slow`; its pieces are tested below
def test_quick_study_measures_plots_and_resumes(tmp_path):
    extra = tmp_path / "distill.json"  # another study's points, drawn as stars
    extra.write_text(json.dumps([dict(model="w8", sampler="distilled", steps=1, cost_flops=4e7, fid=900.0,
                                      accuracy=0.2)]))
    first = _run_quick(tmp_path, f"--config.extra_results={extra}")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "quick"
    points = json.loads((out / "scaling_digits.json").read_text())
    assert len(points) == 2 * 3  # two widths, three samplers at one step count
    for p in points:
        assert all(p[k] is not None for k in FIELDS), p
        assert p["evals"] == 2 * p["steps"]  # guidance: [uncond; cond] is two evaluations per step
        assert p["cost_flops"] == pytest.approx(p["flops_per_eval"] * p["evals"])
        assert np.isfinite(p["fid"]) and p["fid"] > 0
        assert 0.0 <= p["accuracy"] <= 1.0
    by_model = {p["model"]: p for p in points}
    assert set(by_model) == {"w4", "w8"}
    # Doubling every channel count roughly quadruples the parameters and the FLOPs.
    assert 2.5 < by_model["w8"]["params"] / by_model["w4"]["params"] < 4.5
    assert 2.5 < by_model["w8"]["flops_per_eval"] / by_model["w4"]["flops_per_eval"] < 4.5
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| best fid from |" in first.stdout

    # A rerun finds every point measured: it neither trains nor samples, and writes the same results.
    (out / "scaling_digits.json").unlink()
    second = _run_quick(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training" not in second.stdout and " evals, " not in second.stdout
    assert json.loads((out / "scaling_digits.json").read_text()) == points


def _point(model: str, params: int, cost: float, fid: float, accuracy: float = 0.5) -> dict:
    return dict(model=model, params=params, sampler="ddim", steps=1, cost_flops=cost, fid=fid, accuracy=accuracy)


def test_winners_by_budget_takes_the_best_point_within_each_budget():
    points = [_point("small", 1, 1.0, 30.0), _point("small", 1, 4.0, 20.0, 0.9),
              _point("big", 10, 3.0, 40.0), _point("big", 10, 6.0, 10.0)]
    rows = scaling.winners_by_budget(points, "fid")
    assert [(r["budget"], r["model"], r["fid"]) for r in rows] == [
        (1.0, "small", 30.0), (3.0, "small", 30.0), (4.0, "small", 20.0), (6.0, "big", 10.0)]
    assert [r["competing"] for r in rows] == [1, 2, 2, 2]
    assert scaling.budget_ranges(rows) == [(1.0, 4.0, "small", 1, 2), (6.0, 6.0, "big", 2, 2)]
    assert [r["model"] for r in scaling.winners_by_budget(points, "accuracy")] == ["small", "small", "small",
                                                                                    "small"]
    with pytest.raises(ValueError, match="metric"):
        scaling.winners_by_budget(points, "loss")


def test_width_config_scales_channels_and_fixes_the_image_budget():
    config = get_config()
    c = scaling.width_config(config, 16)
    assert c.model.block_out_channels == (16, 32, 32)
    assert c.train.steps * c.train.batch_size == config.images
    config.images = config.recipe.train.batch_size * 10 + 1
    with pytest.raises(ValueError, match="'images'"):
        scaling.width_config(config, 16)
    config.images = 1280
    with pytest.raises(ValueError, match="'widths'.*width 6"):  # 6 channels in norm groups of 4
        scaling.width_config(config, 6)
    large = get_config("large")
    assert [scaling.width_config(large, w).train.steps for w in large.widths] == [1600] * len(large.widths)


def test_model_evals_counts_guidance_twice():
    scheduler = scheduler_for("ddim", get_config().recipe.diffusion)
    assert scaling.model_evals(scheduler, 7, (16, 16, 1), guided=False) == 7
    assert scaling.model_evals(scheduler, 7, (16, 16, 1), guided=True) == 14


def test_read_points_names_a_missing_key(tmp_path):
    path = tmp_path / "points.json"
    path.write_text(json.dumps([{"model": "m", "sampler": "distilled", "steps": 1, "fid": 1.0, "accuracy": 1.0}]))
    with pytest.raises(ValueError, match="cost_flops"):
        scaling.read_points(path)
