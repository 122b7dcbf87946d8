"""The package's layers import only downwards (docs/architecture.md): checked by importing each layer in a
fresh interpreter and listing which diffax modules came with it."""
from __future__ import annotations

import subprocess
import sys

import pytest

# layer -> diffax packages it must never pull in
FORBIDDEN = {
    "diffax.models": ("diffax.convert", "diffax.train", "diffax.pipelines", "diffax.sampling",
                      "diffax.schedulers"),
    "diffax.schedulers": ("diffax.models", "diffax.convert", "diffax.train", "diffax.pipelines"),
    "diffax.sampling": ("diffax.models", "diffax.convert", "diffax.train", "diffax.pipelines"),
    "diffax.convert": ("diffax.train", "diffax.pipelines", "diffax.sampling"),
    "diffax.pipelines": ("diffax.train",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    code = (f"import sys, {layer}\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith('diffax'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    upward = [m for m in loaded if m.startswith(FORBIDDEN[layer])]
    assert not upward, f"importing {layer} pulls in {upward}"


def test_top_level_entry_points_are_lazy():
    code = ("import sys, diffax\n"
            "assert not any(m.startswith(('diffax.convert', 'diffax.train')) for m in sys.modules)\n"
            "import diffax.convert, diffax.sampling, diffax.schedulers, diffax.models\n"
            "assert diffax.load is diffax.convert.load and diffax.save is diffax.convert.save\n"
            "assert diffax.sample is diffax.sampling.sample and diffax.get_family('unet2d').class_name == 'UNet2DModel'\n"
            "assert diffax.scheduler_classes()['DDIMScheduler'] is diffax.schedulers.DDIMScheduler\n"
            "assert sorted(diffax.__all__) == diffax.__all__\n")
    subprocess.run([sys.executable, "-c", code], check=True)
