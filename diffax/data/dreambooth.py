"""DreamBooth's training data: a subject's instance images and its class's images, drawn in pairs.

DreamBooth (Ruiz et al. 2022) fine-tunes a text-to-image model on a few images of one subject captioned with
a rare token ("a photo of sks dog") and keeps what the model knows of the subject's class by training, in
the same batches, on images the model itself made of that class ("a photo of dog"): prior preservation.
As in diffusers' examples/dreambooth/train_dreambooth.py, an epoch holds max(N_instance, N_class) pairs,
pair k being instance image k mod N_instance and class image k mod N_class; a step trains
`train.batch_size` pairs, i.e. that many instance rows and as many class rows, which the train step tells
apart by the batch's 'prior' flags (diffax.train.step.prior_preservation_loss).

The data are a folder of two latent caches (diffax/data/latent_cache.py) written by
`python -m diffax.train.dreambooth --config=...:cache`:

    instance/    the instance images, each with the instance prompt's embedding
    class/       the class images, each with the class prompt's embedding
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffax.data.latent_cache import MANIFEST, LatentCacheError, LatentCacheSource

INSTANCE = "instance"
CLASS = "class"


class _Pairs:
    """Random access to (instance record, class record) pairs: pair k is (k mod N_instance, k mod N_class)."""

    def __init__(self, instance: Any, prior: Any):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        return self.instance[index % len(self.instance)], self.prior[index % len(self.prior)]


class DreamBoothSource:
    """A grain source over a DreamBooth cache folder (`instance/` and `class/` latent caches).

    It has 2 x pairs rows: row 2k is pair k's instance example, row 2k + 1 its class example, each as a
    `LatentCacheSource` example plus 'prior' (False, True). `make_train_iterator` shuffles `stored` (the
    pairs) and `draw`s each as the two rows stacked on a leading axis [2, ...], which the batch puts next to
    each other. `manifest` and `null_cond` are the instance cache's: sample grids show the instance prompt.
    """

    def __init__(self, path: str | Path, *, seed: int = 0):
        """Opens `path/instance` and `path/class` and checks that they were encoded alike.

        Raises:
            LatentCacheError (a ValueError): a missing or corrupt cache, a cache without text, or two caches
                whose latent or text shapes differ.
        """
        self.path = Path(path).expanduser()
        for name in (INSTANCE, CLASS):
            if not (self.path / name / MANIFEST).is_file():
                raise LatentCacheError(f"{self.path / name / MANIFEST}: missing; data.source='dreambooth' reads a "
                                       f"folder holding the latent caches {INSTANCE}/ and {CLASS}/, written by "
                                       f"`python -m diffax.train.dreambooth --config=...:cache`")
        self.instance = LatentCacheSource(self.path / INSTANCE, seed=seed)
        self.prior = LatentCacheSource(self.path / CLASS, seed=seed)
        self.seed = seed
        a, b = self.instance.manifest, self.prior.manifest
        for key in ("latent", "text"):
            if a.get(key) is None:
                raise LatentCacheError(f"{self.path / INSTANCE / MANIFEST}: key {key!r} is empty: DreamBooth trains "
                                       f"a text-conditioned model (write the cache with cache.text_encoder)")
            shapes_a = a[key]["shape"] if key == "latent" else a[key]["shapes"]
            shapes_b = (b.get(key) or {}).get("shape" if key == "latent" else "shapes")
            if shapes_a != shapes_b:
                raise LatentCacheError(f"{self.path / CLASS / MANIFEST}: key {key!r} has shape(s) {shapes_b}, the "
                                       f"instance cache's are {shapes_a}: encode both with the same VAE, text "
                                       f"encoder and image size")
        self.stored = _Pairs(self.instance.stored, self.prior.stored)
        self.manifest = a
        self.null_cond = self.instance.null_cond
        self.null_input_ids = self.instance.null_input_ids  # train.text_encoder's null conditioning
        self.null_input_ids_2 = self.instance.null_input_ids_2
        self.num_classes: int = 0
        self.class_names: list[str] = []

    def __len__(self) -> int:
        return 2 * len(self.stored)

    def draw(self, pair: tuple[dict[str, Any], dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        """A training pair from stored records: the instance and the class example stacked [2, ...], with
        'prior' [2] = (False, True)."""
        rows = [self.instance.draw(pair[0], rng), self.prior.draw(pair[1], rng)]
        out = jax.tree.map(lambda *x: np.stack(x), *rows)
        out["prior"] = np.array([False, True])
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row `index`: pair index // 2's instance (even) or class (odd) example, as `draw` makes it."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        pair = self.draw(self.stored[index // 2], np.random.default_rng([self.seed, index // 2]))
        return jax.tree.map(lambda x: x[index % 2], pair)

    def __repr__(self) -> str:
        return (f"DreamBoothSource(path={str(self.path)!r}, instances={len(self.instance)}, "
                f"class_images={len(self.prior)}, pairs={len(self.stored)})")
