"""Any tensorflow-datasets data set with an image feature, read without TensorFlow.

`tfds.data_source` opens the prepared ArrayRecord files of a data set for
random access, which is exactly what grain's shuffling and sharding need. The
data set must already be prepared in the tfds data directory (`tfds build`, or
`tfds.builder(name).download_and_prepare()` on a machine with network access);
diffax never downloads at run time.

A text feature gives each record a caption (`caption_key`), for the latent cache's text encoder. Nested
features are named with '/', as tfds names them: COCO's `captions/text` is a sequence of texts per image,
and the first is taken, so an epoch sees one caption per image, always the same one.
"""

from __future__ import annotations

import numpy as np

from diffax.data.folder import prepare_image


def _import_tfds():
    """tensorflow_datasets, imported on first use: it is the optional extra `diffax[tfds]`.

    Imported here, not at module level, so that core diffax (digits, image folders) neither needs nor
    pays for it.
    """
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        if e.name != 'tensorflow_datasets':
            raise  # tfds is there but one of its own dependencies is broken: show that error as it is.
        raise ModuleNotFoundError(
            "data.source='tfds' needs tensorflow-datasets, an optional extra of diffax: "
            "pip install 'diffax[tfds]' (or pip install -e '.[tfds]' in a checkout)",
            name='tensorflow_datasets') from e
    return tfds


def _feature(features, key: str):
    """The feature at `key` ('a/b' for nested ones, through sequences as tfds names them), or None."""
    feature = features
    for part in key.split('/'):
        while hasattr(feature, 'feature') and not hasattr(feature, 'keys'):  # Sequence(...) of a dict
            feature = feature.feature
        if not hasattr(feature, 'keys') or part not in feature.keys():
            return None
        feature = feature[part]
    return feature


def _first_text(record: dict, key: str, where: str) -> str:
    """The text at `key` of a decoded record; the first one where the feature is a sequence of texts."""
    value = record
    for part in key.split('/'):
        value = value[part]
    while isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise ValueError(f'{where}: feature {key!r} (data.caption_key) holds no text')
        value = value[0]
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class TfdsSource:
    """A grain random-access source over `tfds.data_source(name, split=split)`.

    Records are `{'image': uint8 [S, S, C], 'label': int64 scalar}`, plus `'caption'` (a str) with a
    `caption_key`; the label is 0 when `label_key` is empty (unconditional training).
    """

    def __init__(self, name: str, *, split: str = 'train', image_key: str = 'image',
                 label_key: str | None = 'label', image_size: int, channels: int,
                 data_dir: str | None = None, caption_key: str | None = None):
        """Opens the data set and checks its features.

        Args:
            name: tfds name, e.g. 'mnist', 'cifar10', 'imagenet2012'.
            split: tfds split string, e.g. 'train' or 'train[:90%]'.
            image_key: the image feature (any size; center-cropped and resized).
            label_key: a `ClassLabel` feature, or None / '' for unlabeled data.
            image_size: side of the square output images.
            channels: 1 or 3.
            data_dir: tfds data directory; None uses tfds' default.
            caption_key: a `Text` feature, or a sequence of them (the first is taken),
                nested keys joined by '/' (COCO: 'captions/text'); None / '': no captions.

        Raises:
            ImportError: tensorflow-datasets is not installed (the extra `diffax[tfds]`).
            ValueError: a configured key is not a feature of the data set, the
                label feature is not a `ClassLabel`, or the caption feature holds no text.
        """
        tfds = _import_tfds()

        self.name = name
        self.split = split
        self.image_key = image_key
        self.label_key = label_key or None
        self.caption_key = caption_key or None
        self.image_size = image_size
        self.channels = channels
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        features = self._source.dataset_info.features
        for what, key in (('image_key', self.image_key), ('label_key', self.label_key)):
            if key is not None and key not in features:
                raise ValueError(
                    f"tfds data set {name!r} has no feature {key!r} (data.{what}); "
                    f'its features are {sorted(features.keys())}')
        if self.caption_key is not None:
            caption = _feature(features, self.caption_key)
            while isinstance(caption, tfds.features.Sequence):
                caption = caption.feature
            if not isinstance(caption, tfds.features.Text):
                got = 'no such feature' if caption is None else f'a {type(caption).__name__}'
                raise ValueError(
                    f'tfds data set {name!r}: data.caption_key {self.caption_key!r} is {got}, not a Text '
                    f'feature (nested keys as "captions/text"); its features are {sorted(features.keys())}')
        self.num_classes: int = 0
        self.class_names: list[str] = []
        if self.label_key is not None:
            label = features[self.label_key]
            if not isinstance(label, tfds.features.ClassLabel):
                raise ValueError(
                    f'tfds data set {name!r}: feature {self.label_key!r} is {type(label).__name__}, '
                    "not a ClassLabel; set data.label_key='' to train without labels")
            self.num_classes = label.num_classes
            self.class_names = list(label.names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._source[index]
        image = prepare_image(np.asarray(record[self.image_key]), self.image_size, self.channels)
        label = 0 if self.label_key is None else record[self.label_key]
        out = {'image': image, 'label': np.int64(label)}
        if self.caption_key is not None:
            out['caption'] = _first_text(record, self.caption_key, f'tfds data set {self.name!r} record {index}')
        return out

    def __repr__(self) -> str:
        return (f'TfdsSource(name={self.name!r}, split={self.split!r}, num_records={len(self)}, '
                f'image_size={self.image_size}, channels={self.channels})')
