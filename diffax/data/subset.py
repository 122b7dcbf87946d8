"""A source's records of some classes only (`data.classes`), e.g. for a transfer task: pretrain on digits 0-4,
adapt to 5-9. Labels keep their values, so a model trained on the subset keeps the full class table."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class ClassSubset:
    """The records of `source` whose label is one of `classes`, in the source's order.

    Finding them reads every record's label once (the digits take a moment; a large tfds split a full pass).
    """

    def __init__(self, source: Any, classes: Sequence[int]):
        classes = tuple(int(c) for c in classes)
        n = source.num_classes
        bad = [c for c in classes if not 0 <= c < n]
        if not n or bad:
            raise ValueError(f"data.classes: {bad or list(classes)} are not labels of this source "
                             f"({'classes 0..' + str(n - 1) if n else 'it is unlabeled'})")
        labels = np.array([int(source[i]["label"]) for i in range(len(source))])
        self._index = np.flatnonzero(np.isin(labels, classes))
        if not len(self._index):
            raise ValueError(f"data.classes: the source holds no record of the classes {list(classes)}")
        self._source = source
        self.classes = classes
        self.num_classes: int = n
        self.class_names: list[str] = list(source.class_names)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._source[int(self._index[index])]

    def __repr__(self) -> str:
        return f"ClassSubset({self._source!r}, classes={self.classes})"
