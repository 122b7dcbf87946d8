"""Array images resize as torch's 'nearest' does, the resize diffusers' image processor runs on tensors."""
from __future__ import annotations

import numpy as np
import torch

from diffax.pipelines.images import load_images


def test_nearest_resize_matches_torch_for_every_size_pair():
    mismatches = []
    for size_in in range(8, 120, 8):
        x = np.random.default_rng(size_in).uniform(0, 1, (1, size_in, 8, 3)).astype(np.float32)
        for size_out in range(8, 200, 8):
            got = load_images(x, size_out, 8)
            want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(size_out, 8),
                                                   mode="nearest").numpy().transpose(0, 2, 3, 1)
            if not np.array_equal(got, want):
                mismatches.append((size_in, size_out))
    assert not mismatches, mismatches  # float64 index arithmetic got 22 of these wrong, e.g. 24 -> 88
