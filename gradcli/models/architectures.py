"""The built-in networks (CIFAR ResNet-18, WideResNet-28-10, the small MNIST CNN) and their family.

Parameter names follow the reference repositories so that their checkpoints load unchanged.
``_BUILTINS`` maps each built-in name to its constructor, default class count and
preprocessing; ``_build_builtin`` builds one and loads its weights. Separate from the other
families because these are the only networks gradcli defines itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradcli.config import CIFAR_MEAN, CIFAR_STD, Preprocess
from gradcli.models.checkpoints import (
    _load_state_dict_checked,
    _num_classes_from_state_dict,
    _read_weights,
)
from gradcli.models.loaded import _Built

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class CifarBasicBlock(nn.Module):
    """ResNet basic block with a projection shortcut, named as in kuangliu/pytorch-cifar."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3×3 stride-1 stem, no max-pool, four stages, global average pool, ``linear``.

    Parameter names follow kuangliu/pytorch-cifar so that its checkpoints load unchanged.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            blocks.append(CifarBasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def cifar_resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 for 32×32 inputs (11.17M parameters at 10 classes)."""
    return CifarResNet([2, 2, 2, 2], num_classes)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block, named as in xternalz/WideResNet-pytorch."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in the reference code: with a projection shortcut, the shortcut also sees the
        # pre-activated input.
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideNetworkBlock(nn.Module):
    """A stage of ``num_layers`` wide blocks; the first one changes width and stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(num_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k for CIFAR (Zagoruyko & Komodakis 2016), xternalz naming."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideNetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideNetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideNetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def wrn28_10(num_classes: int = 10) -> WideResNet:
    """WideResNet-28-10 (36.5M parameters at 10 classes)."""
    return WideResNet(28, 10, num_classes)


class MnistCNN(nn.Module):
    """Small 28×28 grey-scale CNN (about 106k parameters): two conv/pool stages, two linears."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(x), 1)
        return self.fc(F.relu(self.fc1(out)))


def mnist_cnn(num_classes: int = 10) -> MnistCNN:
    """The demo model: fast enough to train and score on a laptop CPU."""
    return MnistCNN(num_classes)


@dataclass(frozen=True)
class _Builtin:
    build: Callable[[int], nn.Module]
    default_num_classes: int
    preprocess: Preprocess


_CIFAR_PREPROCESS = Preprocess((32, 32), 3, CIFAR_MEAN, CIFAR_STD)
_BUILTINS: dict[str, _Builtin] = {
    "cifar_resnet18": _Builtin(cifar_resnet18, 10, _CIFAR_PREPROCESS),
    "wrn28_10": _Builtin(wrn28_10, 10, _CIFAR_PREPROCESS),
    "mnist_cnn": _Builtin(mnist_cnn, 10, Preprocess((28, 28), 1, MNIST_MEAN, MNIST_STD)),
}


def _build_builtin(name: str, weights: str | None, num_classes: int | None, trust: bool) -> _Built:
    builtin = _BUILTINS[name]
    state_dict, weights_path, sha = None, None, None
    if weights is not None:
        weights_path, state_dict, sha = _read_weights(weights, name, trust)
    classes = num_classes or builtin.default_num_classes
    model = builtin.build(classes)
    if state_dict is not None:
        if num_classes is None:
            inferred = _num_classes_from_state_dict(model, state_dict)
            if inferred is not None:
                model = builtin.build(inferred)
        _load_state_dict_checked(model, state_dict, name, weights_path)
    return _Built(model, name, weights_path, sha, builtin.preprocess)
