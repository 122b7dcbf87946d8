"""Input pipelines: grain over scikit-learn's digits, tensorflow-datasets, image folders and latent caches.

    source = make_source(config.data)          # records {'image': uint8 [S, S, C], 'label': int64}
    it = make_train_iterator(source, global_batch_size=256, seed=0)
    batch = next(it)                           # {'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]}

See docs/data.md.
"""

from diffax.data.digits import DigitsSource
from diffax.data.folder import IMAGE_EXTENSIONS, FolderSource, prepare_image
from diffax.data.latent_cache import LatentCacheError, LatentCacheSource
from diffax.data.pipeline import SOURCES, Source, make_source, make_train_iterator
from diffax.data.tfds_source import TfdsSource

__all__ = [
    'DigitsSource',
    'FolderSource',
    'IMAGE_EXTENSIONS',
    'LatentCacheError',
    'LatentCacheSource',
    'SOURCES',
    'Source',
    'TfdsSource',
    'make_source',
    'make_train_iterator',
    'prepare_image',
]
