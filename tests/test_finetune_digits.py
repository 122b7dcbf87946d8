"""The fine-tuning comparison study (diffax.studies.finetune_digits): its tasks, the style transform, the data
each run trains on, the table; and, under `slow`, the whole study at --quick sizes for the style task and for
the latent-diffusion family (the class task's --quick run is in tests/test_finetune.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffax.data.digits import load_digits_arrays  # noqa: E402
from diffax.data.folder import FolderSource  # noqa: E402
from diffax.studies import finetune_digits as study  # noqa: E402


def test_task_split():
    """classes: disjoint pretraining and adaptation digits; style: all ten in both; anything else refused."""
    pre, adapt = study.task_split("classes")
    assert set(pre).isdisjoint(adapt) and sorted(pre + adapt) == list(range(10))
    assert study.task_split("style") == (tuple(range(10)), tuple(range(10)))
    with pytest.raises(study.StudyError, match="--task"):
        study.task_split("colour")
    with pytest.raises(study.StudyError, match="--family"):
        study.Study(task="style", family="dit", workdir=Path("x"))


def test_restyle_thickens_every_stroke():
    """A 3x3 max filter: never darker anywhere, more ink, the same background, each pixel the max of its
    3x3 neighbourhood."""
    images, _ = load_digits_arrays(16, 1)
    images = np.asarray(images[:50])
    thick = study.restyle(images)
    assert thick.shape == images.shape and thick.dtype == np.uint8
    assert (thick >= images).all()
    assert (thick > 127).sum() > 1.3 * (images > 127).sum()
    padded = np.pad(images[3, ..., 0], 1)
    expected = np.max([padded[i:i + 16, j:j + 16] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_array_equal(thick[3, ..., 0], expected)
    with pytest.raises(study.StudyError, match="restyle"):
        study.restyle(images[0])


def test_restyled_folder_reads_back_with_labels_and_captions(tmp_path):
    """The folder a style run trains on holds every digit restyled, under its own label, with its caption."""
    folder = study.write_restyled_folder(tmp_path / "thick", "a handwritten {}")
    source = FolderSource(folder, image_size=16, channels=1)
    images, labels = load_digits_arrays(16, 1)
    assert len(source) == len(labels) and source.class_names == [str(d) for d in range(10)]
    first = {int(r["label"]) for r in (source[i] for i in range(0, len(source), 97))}
    assert len(first) > 5
    name = source._items[0][0].name  # '<index>.png' of the digits' order
    record = source[0]
    np.testing.assert_array_equal(record["image"], study.restyle(images[int(name[:-4])][None])[0])
    assert record["label"] == labels[int(name[:-4])] and record["caption"] == "a handwritten zero"


def test_settings_train_on_the_task_data(tmp_path):
    """Pretraining and adaptation read the task's classes and style, for both families."""
    classes = study.Study(task="classes", family="unet", workdir=tmp_path / "c")
    assert study.settings(classes, None, None, 5)["data.classes"] == (0, 1, 2, 3, 4)
    lora = study.settings(classes, "lora", tmp_path / "base", 5)
    assert lora["data.classes"] == (5, 6, 7, 8, 9) and lora["train.finetune"] == "lora"
    style = study.Study(task="style", family="unet", workdir=tmp_path / "s")
    assert "data.classes" not in study.settings(style, None, None, 5)
    tuned = study.settings(style, "tuneqdm", tmp_path / "base", 5)
    assert tuned["data.source"] == "folder" and "data.classes" not in tuned
    assert Path(tuned["data.path"]).is_dir() and tuned["train.tuneqdm.groups"] == 4
    ldm = study.settings(study.Study(task="classes", family="ldm", workdir=tmp_path / "l"), "full", tmp_path, 5)
    assert ldm["data.path"] == str(study.LDM_ROOT / "cache") and ldm["data.classes"] == (5, 6, 7, 8, 9)
    config = study.make_config("ldm", ldm)
    assert config.model.name == "UNet2DConditionModel" and config.train.steps == 5
    assert study.Study(task="style", family="ldm", workdir=tmp_path).name == "finetune_digits_ldm_style"


def test_table_and_doc_markers(tmp_path):
    """The style table has both FIDs; a doc without the study's markers is refused by name."""
    rows = [{"mode": "no tuning", "accuracy": 0.9, "fid": 200.0, "fid_source": 30.0},
            {"mode": "tuneqdm", "trainable": 10, "step_mib": 1.0, "rss_mib": 900.0, "saved_bytes": 4096,
             "wall_s": 3.0, "accuracy": 0.8, "fid": 50.0, "fid_source": 150.0}]
    text = study.table(rows, "style")
    assert "FID (restyled) | FID (original)" in text and "| 50.00 | 150.00 |" in text and "4.0 KiB" in text
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- finetune_digits_style:begin -->\nold\n<!-- finetune_digits_style:end -->\nb\n")
    study.write_doc(doc, "finetune_digits_style", text)
    assert "old" not in doc.read_text() and text in doc.read_text() and doc.read_text().endswith("b\n")
    with pytest.raises(study.StudyError, match="finetune_digits_ldm:begin"):
        study.write_doc(doc, "finetune_digits_ldm", text)


def _quick(tmp_path: Path, *flags: str) -> dict[str, dict]:
    run = subprocess.run([sys.executable, "-m", "diffax.studies.finetune_digits", "--quick", *flags,
                          f"--workdir={tmp_path}", "--nowrite_docs"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("full", "lora", "tuneqdm")}
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["tuneqdm"]["trainable"] < rows["lora"]["trainable"]
    assert rows["tuneqdm"]["saved_bytes"] < rows["full"]["saved_bytes"]
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["fid"]) and r["step_mib"] > 0 for r in rows.values())
    return rows


@pytest.mark.slow  # seven processes and compilations of the tiny U-Net: minutes
def test_style_study_quick(tmp_path):
    """`--task=style --quick`: every row measured, with the FID to both styles."""
    rows = _quick(tmp_path, "--task=style")
    assert all(np.isfinite(r["fid_source"]) for r in rows.values())
    assert "FID (restyled)" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "finetune_digits_style.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(not (study.LDM_ROOT / "cache" / "manifest.json").exists(),
                    reason="needs `make demo-ldm`'s VAE, text encoder and latent cache in runs/ldm_digits")
@pytest.mark.parametrize("task", ["classes", "style"])
def test_ldm_study_quick(tmp_path, task):
    """`--family=ldm --quick`: a tiny text-conditioned U-Net on the demo's latents, every mode, both tasks."""
    _quick(tmp_path, "--family=ldm", f"--task={task}")
    name = "finetune_digits_ldm" + ("_style" if task == "style" else "")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
