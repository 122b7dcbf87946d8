"""Any tensorflow-datasets data set with an image feature, read without TensorFlow.

`tfds.data_source` opens the prepared ArrayRecord files of a data set for
random access, which is exactly what grain's shuffling and sharding need. The
data set must already be prepared in the tfds data directory (`tfds build`, or
`tfds.builder(name).download_and_prepare()` on a machine with network access);
diffax never downloads at run time.
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


class TfdsSource:
    """A grain random-access source over `tfds.data_source(name, split=split)`.

    Records are `{'image': uint8 [S, S, C], 'label': int64 scalar}`; the label
    is 0 when `label_key` is empty (unconditional training).
    """

    def __init__(self, name: str, *, split: str = 'train', image_key: str = 'image',
                 label_key: str | None = 'label', image_size: int, channels: int,
                 data_dir: str | None = None):
        """Opens the data set and checks its features.

        Args:
            name: tfds name, e.g. 'mnist', 'cifar10', 'imagenet2012'.
            split: tfds split string, e.g. 'train' or 'train[:90%]'.
            image_key: the image feature (any size; center-cropped and resized).
            label_key: a `ClassLabel` feature, or None / '' for unlabeled data.
            image_size: side of the square output images.
            channels: 1 or 3.
            data_dir: tfds data directory; None uses tfds' default.

        Raises:
            ImportError: tensorflow-datasets is not installed (the extra `diffax[tfds]`).
            ValueError: a configured key is not a feature of the data set, or the
                label feature is not a `ClassLabel`.
        """
        tfds = _import_tfds()

        self.name = name
        self.split = split
        self.image_key = image_key
        self.label_key = label_key or None
        self.image_size = image_size
        self.channels = channels
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        features = self._source.dataset_info.features
        for what, key in (('image_key', self.image_key), ('label_key', self.label_key)):
            if key is not None and key not in features:
                raise ValueError(
                    f"tfds data set {name!r} has no feature {key!r} (data.{what}); "
                    f'its features are {sorted(features.keys())}')
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
        return {'image': image, 'label': np.int64(label)}

    def __repr__(self) -> str:
        return (f'TfdsSource(name={self.name!r}, split={self.split!r}, num_records={len(self)}, '
                f'image_size={self.image_size}, channels={self.channels})')
