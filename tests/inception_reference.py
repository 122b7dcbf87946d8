"""A torch Inception-v3 (Szegedy et al. 2015) in the form pytorch-fid 0.3.0 builds its FID network on,
so that tests/test_inception.py can run pytorch-fid's own `pytorch_fid/inception.py` unchanged.

pytorch-fid imports torchvision and takes from it `__version__`, `models.inception_v3` and the block
classes `models.inception.InceptionA`, `InceptionC` and `InceptionE`, which it subclasses (keeping
their layers, replacing their forward). PyPI's torchvision for torch 2.13 is a CUDA build that cannot
be imported beside the CPU torch the tests use, so `install_as_torchvision` puts this module in its
place.

Module and attribute names (`Mixed_6b.branch7x7dbl_3.conv.weight`, ...) are the keys of pytorch-fid's
weight file and `load_state_dict` is strict, so they follow that file exactly. The forwards that
pytorch-fid keeps are the stem units, `InceptionB` (Mixed_6a) and `InceptionD` (Mixed_7a); the
A, C and E forwards here are torchvision's behaviour (the padding counted in the average pool), which
pytorch-fid overrides.
"""
import sys
import types
from typing import Callable, Union

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# pytorch-fid reads the version to choose its keyword arguments: >= 0.13 passes `weights=` and
# `init_weights=False`.
__version__ = "0.28.0"


class ConvUnit(nn.Module):
    """Convolution without bias, batch norm, ReLU: the unit every Inception layer is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Union[int, tuple[int, int]],
                 stride: int = 1, padding: Union[int, tuple[int, int]] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        # eps of TensorFlow's batch norm, which the FID weights were trained with.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W]
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # torchvision's pool branch counts the zero padding in the mean (pytorch-fid's patch does not).
    return F.avg_pool2d(x, 3, stride=1, padding=1)


def _max_pool_3x3_s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=2)


# A branch step: a unit's name, two units' names applied side by side to the same input and concatenated
# (the 1x3 / 3x1 split of Inception-E), or a pool.
Step = Union[str, tuple[str, str], Callable[[Tensor], Tensor]]


class _Mixed(nn.Module):
    """Parallel branches over one input, concatenated along channels in branch order.

    Units are direct children (`self.<name>`), not grouped per branch, because the weight keys have no
    branch level; `self.branches` lists, per branch, the steps that run in order.
    """
    branches: list[list[Step]]

    def unit(self, name: str, *args, **kwargs) -> str:
        self.add_module(name, ConvUnit(*args, **kwargs))
        return name

    def _step(self, step: Step, x: Tensor) -> Tensor:
        if isinstance(step, str):
            return self.get_submodule(step)(x)
        if isinstance(step, tuple):
            return torch.cat([self.get_submodule(name)(x) for name in step], 1)
        return step(x)

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W]
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                y = self._step(step, y)
            outputs.append(y)
        return torch.cat(outputs, 1)


class InceptionA(_Mixed):
    """35x35 block (Mixed_5b-5d): 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; pool -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        c = in_channels
        self.branches = [
            [self.unit("branch1x1", c, 64, 1)],
            [self.unit("branch5x5_1", c, 48, 1), self.unit("branch5x5_2", 48, 64, 5, padding=2)],
            [self.unit("branch3x3dbl_1", c, 64, 1), self.unit("branch3x3dbl_2", 64, 96, 3, padding=1),
             self.unit("branch3x3dbl_3", 96, 96, 3, padding=1)],
            [_avg_pool_3x3, self.unit("branch_pool", c, pool_features, 1)],
        ]


class InceptionB(_Mixed):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3; 1x1 -> 3x3 -> strided 3x3; strided max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels
        self.branches = [
            [self.unit("branch3x3", c, 384, 3, stride=2)],
            [self.unit("branch3x3dbl_1", c, 64, 1), self.unit("branch3x3dbl_2", 64, 96, 3, padding=1),
             self.unit("branch3x3dbl_3", 96, 96, 3, stride=2)],
            [_max_pool_3x3_s2],
        ]


class InceptionC(_Mixed):
    """17x17 block (Mixed_6b-6e), 7x7 factorised into 1x7 and 7x1 at `channels_7x7` channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c, c7 = in_channels, channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branches = [
            [self.unit("branch1x1", c, 192, 1)],
            [self.unit("branch7x7_1", c, c7, 1), self.unit("branch7x7_2", c7, c7, **row),
             self.unit("branch7x7_3", c7, 192, **col)],
            [self.unit("branch7x7dbl_1", c, c7, 1), self.unit("branch7x7dbl_2", c7, c7, **col),
             self.unit("branch7x7dbl_3", c7, c7, **row), self.unit("branch7x7dbl_4", c7, c7, **col),
             self.unit("branch7x7dbl_5", c7, 192, **row)],
            [_avg_pool_3x3, self.unit("branch_pool", c, 192, 1)],
        ]


class InceptionD(_Mixed):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1 -> strided 3x3; 1x1 -> 1x7 -> 7x1 -> strided 3x3; max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels
        self.branches = [
            [self.unit("branch3x3_1", c, 192, 1), self.unit("branch3x3_2", 192, 320, 3, stride=2)],
            [self.unit("branch7x7x3_1", c, 192, 1),
             self.unit("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
             self.unit("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)),
             self.unit("branch7x7x3_4", 192, 192, 3, stride=2)],
            [_max_pool_3x3_s2],
        ]


class InceptionE(_Mixed):
    """8x8 block (Mixed_7b, 7c): 1x1; 1x1 -> (1x3 | 3x1); 1x1 -> 3x3 -> (1x3 | 3x1); pool -> 1x1."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branches = [
            [self.unit("branch1x1", c, 320, 1)],
            [self.unit("branch3x3_1", c, 384, 1),
             (self.unit("branch3x3_2a", 384, 384, **row), self.unit("branch3x3_2b", 384, 384, **col))],
            [self.unit("branch3x3dbl_1", c, 448, 1), self.unit("branch3x3dbl_2", 448, 384, 3, padding=1),
             (self.unit("branch3x3dbl_3a", 384, 384, **row), self.unit("branch3x3dbl_3b", 384, 384, **col))],
            [_avg_pool_3x3, self.unit("branch_pool", c, 192, 1)],
        ]


class Inception3(nn.Module):
    """The layers pytorch-fid takes from the network, under the weight file's names.

    pytorch-fid assembles its own forward from these (with its own pools), so there is none here, and
    no pool, dropout or auxiliary classifier: they hold no weights. `fc` is kept because the weight
    file has it and pytorch-fid loads the file strictly.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.fc = nn.Linear(2048, num_classes)


def inception_v3(*, num_classes: int, aux_logits: bool, weights: None = None,
                 init_weights: bool = False) -> Inception3:
    """The network pytorch-fid asks for: `inception_v3(num_classes=1008, aux_logits=False, weights=None,
    init_weights=False)`. Anything else (pretrained weights, the auxiliary classifier, torchvision's
    weight initialisation) is not built here and is an error."""
    if weights is not None or aux_logits or init_weights:
        raise ValueError("inception_reference.inception_v3 builds only weights=None, aux_logits=False, "
                         f"init_weights=False; got {weights=}, {aux_logits=}, {init_weights=}")
    return Inception3(num_classes)


def install_as_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes `import torchvision` (and `.models`, `.models.inception`) give this module for the rest of the
    test (pytest's monkeypatch undoes it). `torchvision.transforms` is an empty module: pytorch-fid's
    fid_score imports it for its image-folder loader, which the tests do not call."""
    this = sys.modules[__name__]
    models = types.ModuleType("torchvision.models")
    models.inception_v3 = inception_v3
    models.inception = this
    transforms = types.ModuleType("torchvision.transforms")
    package = types.ModuleType("torchvision")
    package.__version__ = __version__
    package.models = models
    package.transforms = transforms
    for name, module in (("torchvision", package), ("torchvision.models", models),
                         ("torchvision.models.inception", this), ("torchvision.transforms", transforms)):
        monkeypatch.setitem(sys.modules, name, module)
