"""Model specs → an eval-mode ``nn.Module`` with a (features, logits) split and its preprocessing.

A model spec is one of:

1. a torchvision classification architecture name (``resnet18``, ``vit_b_16``, ...), built
   without weights; ``weights`` is a local checkpoint or a torchvision weights name such as
   ``IMAGENET1K_V1`` that must already sit in the torch hub cache (nothing is ever downloaded);
   without weights, ``random_weights=True`` must say that untrained weights are meant;
2. a built-in network: ``cifar_resnet18``, ``wrn28_10`` (CIFAR, 32×32) or ``mnist_cnn``
   (the small 28×28 demo model);
3. a user factory, ``path/to/file.py:factory`` or ``package.module:factory``: a callable that
   returns an ``nn.Module``;
4. a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.torchscript``).

Built-in and torchvision models come with their preprocessing recipe (size, resize/crop,
mean/std); user factories and TorchScript files get images at their stored size unless an
input size is given.

The features are the input of one layer, by default the last ``nn.Linear`` in module order
(the classifier), so that the score functions can use both the penultimate features and the
model's own logits from a single forward pass.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from gradcli.config import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from gradcli.distributed import parse_device
from gradcli.errors import BadInputError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
IMAGENET_PREPROCESS = Preprocess((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD, resize=256)
# Without an input size (images at their stored size) the probe tries these sizes in turn:
# any size for a fully convolutional model, or the one size a fixed-size model takes.
_PROBE_SIZES = ((224, 224), (32, 32), (28, 28), (64, 64), (96, 96), (299, 299), (8, 8))

# Keys under which training scripts commonly nest the state_dict in a checkpoint dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


# --------------------------------------------------------------------------------------------
# Built-in networks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for scoring: eval mode, on its device, with a known feature layer.

    ``feature_layer`` names (as in ``named_modules``) the module whose *input* is the feature
    vector; ``classifier`` is that module when it is a linear layer (for TorchScript models an
    ``nn.Linear`` sharing the scripted layer's parameters), else ``None``.
    """

    module: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None
    feature_layer: str
    classifier: nn.Linear | None
    preprocess: Preprocess
    num_classes: int
    feature_dim: int | None = None
    random_weights: bool = False

    def describe(self) -> dict:
        """JSON-able summary, recorded in the run store so results name their model."""
        record = {
            "spec": self.spec,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "feature_layer": self.feature_layer,
            "feature_dim": self.feature_dim,
            "preprocess": self.preprocess.to_dict(),
            "num_classes": self.num_classes,
            "architecture": _architecture_name(self.module),
            "num_parameters": sum(p.numel() for p in self.module.parameters()),
        }
        if self.random_weights:  # a torchvision architecture run untrained, on purpose
            record["random_weights"] = True
        return record

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of ``x`` (B, C, H, W) → features (B, D) float32, logits (B, classes).

        Features are the flattened input of ``feature_layer``; both outputs keep their autograd
        graph when grad is enabled.
        """
        target = _submodule(self.module, self.feature_layer)
        if _is_script_module(target):
            features, logits = _run_sequential_capturing(
                self.module, self.feature_layer.split("."), x
            )
        else:
            captured: list[torch.Tensor] = []

            def capture_input(_module: nn.Module, args: tuple) -> None:
                captured.append(args[0])

            handle = target.register_forward_pre_hook(capture_input)
            try:
                logits = self.module(x)
            finally:
                handle.remove()
            if not captured:
                raise BadInputError(
                    f"layer {self.feature_layer!r} of model {self.spec} was not called in the "
                    "forward pass; pass --feature-layer with a layer the forward pass uses"
                )
            features = captured[-1]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise BadInputError(
                f"model {self.spec} returned {got} instead of (batch, classes) logits; "
                "wrap it so that forward returns the logits tensor"
            )
        if not isinstance(features, torch.Tensor):
            raise BadInputError(
                f"the input of layer {self.feature_layer!r} is not a tensor; "
                "pass --feature-layer with a layer that takes one tensor"
            )
        return features.flatten(1).float(), logits


def _architecture_name(module: nn.Module) -> str:
    if _is_script_module(module):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Built-in model names: this package's networks, then torchvision classification models."""
    return list(_BUILTINS) + sorted(_torchvision_names())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    spec: str,
    weights: str | None = None,
    *,
    feature_layer: str | None = None,
    input_size: tuple[int, int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    resize: int | None = None,
    resize_rounding: str = "uint8",
    random_weights: bool = False,
) -> LoadedModel:
    """Build the model a spec names, load its weights, and find its feature layer.

    ``input_size``/``resize``/``mean``/``std`` override the preprocessing recipe (user
    factories and TorchScript files have none: their images keep their stored size unless
    ``input_size`` is given); ``resize_rounding`` is ``"uint8"`` (PIL/torchvision) or
    ``"float"``. ``num_classes`` sets the output width of built-in and torchvision networks
    (and is passed to factories). A torchvision architecture needs ``weights`` or
    ``random_weights=True``. Checkpoints are read with ``weights_only=True`` unless
    ``trust_checkpoint``.
    """
    spec = str(spec).strip()
    if not spec:
        raise BadInputError("the model spec is empty; give a model name, file.py:factory or a file")
    if num_classes is not None and int(num_classes) < 1:
        raise BadInputError(f"--num-classes must be at least 1, not {num_classes}")
    torch_device = parse_device(device)
    weights = None if weights is None else str(weights)
    if random_weights and weights is not None:
        raise BadInputError(
            f"--model {spec} got both --weights and --random-weights; drop one of them"
        )

    if _is_factory_spec(spec):
        built = _build_factory(spec, weights, num_classes, trust_checkpoint)
    elif spec in _BUILTINS:
        built = _build_builtin(spec, weights, num_classes, trust_checkpoint)
    elif spec in _torchvision_names():
        if weights is None and not random_weights:
            raise BadInputError(
                f"--model {spec} needs --weights FILE (a local checkpoint) or --random-weights "
                "to use untrained weights"
            )
        built = _build_torchvision(spec, weights, num_classes, trust_checkpoint)
    elif spec.lower().endswith(TORCHSCRIPT_SUFFIXES) or os.path.isfile(spec):
        built = _build_torchscript(spec, weights, trust_checkpoint)
    else:
        close = difflib.get_close_matches(spec, list_models(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise BadInputError(
            f"unknown model {spec!r}: {hint}give a built-in or torchvision name (e.g. "
            "cifar_resnet18, mnist_cnn, resnet50), a TorchScript file, or file.py:factory"
        )

    module = built.module
    base = built.preprocess or _default_preprocess(module, mean)
    preprocess = _override_preprocess(base, input_size, mean, std, resize, resize_rounding)

    module.to(torch_device)
    module.eval()
    layer = _resolve_feature_layer(module, feature_layer, built.spec)
    target = _submodule(module, layer)
    if _is_script_module(target):
        _check_sequential_path(module, layer, built.spec)
    loaded = LoadedModel(
        module=module,
        spec=built.spec,
        weights=built.weights,
        weights_sha256=built.weights_sha256,
        feature_layer=layer,
        classifier=_as_linear(target),
        preprocess=preprocess,
        num_classes=0,
        random_weights=weights is None and spec in _torchvision_names(),
    )
    features, logits = _probe(loaded, torch_device)
    loaded.num_classes = int(logits.shape[1])
    loaded.feature_dim = int(features.shape[1])
    if num_classes is not None and loaded.num_classes != int(num_classes):
        raise BadInputError(
            f"model {built.spec} has {loaded.num_classes} outputs but --num-classes is "
            f"{num_classes}; drop --num-classes or fix the model"
        )
    return loaded


# --------------------------------------------------------------------------------------------
# Building each kind of spec
# --------------------------------------------------------------------------------------------


@dataclass
class _Built:
    module: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None
    preprocess: Preprocess | None  # None: derive the default from the module


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


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _build_torchvision(
    name: str, weights: str | None, num_classes: int | None, trust: bool
) -> _Built:
    import torchvision.models as tvm

    weights_enum = None
    state_dict, weights_given, sha = None, None, None
    if weights is not None:
        if _looks_like_path(weights):
            weights_given = _existing_weights_file(weights, name)
            checkpoint_path = weights_given
        else:
            weights_enum = _resolve_torchvision_weights(name, weights)
            weights_given = weights
            checkpoint_path = _hub_checkpoint_path(weights_enum)
            if not os.path.isfile(checkpoint_path):
                raise BadInputError(
                    f"weights {weights} for {name} are not in the local torch hub cache: "
                    f"download {weights_enum.url} to {checkpoint_path} or pass a local weights "
                    "file with --weights"
                )
        state_dict = load_checkpoint(checkpoint_path, trust)
        sha = sha256_file(checkpoint_path)
        if name.startswith("densenet"):
            state_dict = _rename_legacy_densenet_keys(state_dict)

    kwargs = _torchvision_build_kwargs(name, weights_enum, state_dict)
    if weights_enum is not None:
        categories = len(weights_enum.meta["categories"])
        if num_classes is not None and num_classes != categories:
            raise BadInputError(
                f"weights {weights} have {categories} classes but --num-classes is "
                f"{num_classes}; drop --num-classes or pass a fine-tuned weights file"
            )
        kwargs["num_classes"] = categories
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = tvm.get_model(name, weights=None, **kwargs)
    if state_dict is not None:
        if weights_enum is None and num_classes is None:
            inferred = _num_classes_from_state_dict(model, state_dict)
            if inferred is not None:
                model = tvm.get_model(name, weights=None, **{**kwargs, "num_classes": inferred})
        _load_state_dict_checked(model, state_dict, name, weights_given)
    _drop_auxiliary_heads(model)

    preprocess = IMAGENET_PREPROCESS
    if weights_enum is not None:
        preprocess = _preprocess_from_weights(weights_enum)
    return _Built(model, name, weights_given, sha, preprocess)


def _resolve_torchvision_weights(arch: str, weights: str):
    """``IMAGENET1K_V1``, ``DEFAULT`` or ``ResNet18_Weights.IMAGENET1K_V1`` → the enum member."""
    import torchvision.models as tvm

    try:
        enum_cls = tvm.get_model_weights(arch)
    except Exception as err:
        raise BadInputError(
            f"torchvision has no weights names for {arch}; pass a local weights file"
        ) from err
    member = weights
    if "." in weights:
        class_name, member = weights.split(".", 1)
        if class_name != enum_cls.__name__:
            raise BadInputError(
                f"weights {weights} are not for {arch}; use {enum_cls.__name__}.NAME "
                f"with NAME one of {', '.join(enum_cls.__members__)}"
            )
    try:
        return enum_cls[member]
    except KeyError:
        raise BadInputError(
            f"unknown weights {weights!r} for {arch}: use one of "
            f"{', '.join(enum_cls.__members__)} or a local weights file"
        ) from None


def _hub_checkpoint_path(weights_enum) -> str:
    """Where ``torch.hub`` caches the file of a torchvision weights entry."""
    filename = os.path.basename(urlparse(weights_enum.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _preprocess_from_weights(weights_enum) -> Preprocess:
    transforms = weights_enum.transforms()
    crop = getattr(transforms, "crop_size", [224])
    resize = getattr(transforms, "resize_size", None)
    return Preprocess(
        input_size=(int(crop[0]), int(crop[-1])),
        channels=3,
        mean=tuple(float(m) for m in getattr(transforms, "mean", IMAGENET_MEAN)),
        std=tuple(float(s) for s in getattr(transforms, "std", IMAGENET_STD)),
        resize=int(resize[0]) if resize else None,
    )


def _torchvision_build_kwargs(name: str, weights_enum, state_dict: dict | None) -> dict:
    """The constructor arguments torchvision's own builders set when they load weights."""
    kwargs: dict = {}
    if name in ("googlenet", "inception_v3"):
        has_aux = state_dict is not None and any(
            k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in state_dict
        )
        kwargs["aux_logits"] = has_aux
        kwargs["init_weights"] = state_dict is None
        if weights_enum is not None:
            kwargs["transform_input"] = True
    if weights_enum is not None and name.startswith("vit_"):
        kwargs["image_size"] = weights_enum.meta["min_size"][0]
    if weights_enum is not None and name.startswith("maxvit"):
        kwargs["input_size"] = weights_enum.meta["min_size"]
    return kwargs


def _drop_auxiliary_heads(model: nn.Module) -> None:
    """Remove training-only auxiliary classifiers: they never run in eval mode, so their
    parameters would only add zero gradients."""
    import torchvision.models as tvm

    if isinstance(model, tvm.GoogLeNet):
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None
    elif isinstance(model, tvm.Inception3):
        model.aux_logits = False
        model.AuxLogits = None


_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_legacy_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet checkpoints (including torchvision's own) name layers ``norm.1``."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _is_factory_spec(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target) and re.fullmatch(r"[A-Za-z_][\w.]*", attr) is not None


def _build_factory(spec: str, weights: str | None, num_classes: int | None, trust: bool) -> _Built:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise BadInputError(f"model file {path} not found; check the path in --model")
        normalized = f"{path}:{attr}"
        search_dir = os.path.dirname(path)
        with _prepended_sys_path(search_dir):
            python_module = _import_file(path)
            model = _call_factory(python_module, attr, normalized, num_classes)
    else:
        normalized = spec
        python_module = _import_module(target)
        model = _call_factory(python_module, attr, normalized, num_classes)

    weights_path, sha = None, None
    if weights is not None:
        weights_path, state_dict, sha = _read_weights(weights, normalized, trust)
        _load_state_dict_checked(model, state_dict, normalized, weights_path)
    return _Built(model, normalized, weights_path, sha, None)


@contextlib.contextmanager
def _prepended_sys_path(directory: str) -> Iterator[None]:
    """Let a model file import the modules next to it while it is imported and called."""
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def _import_file(path: str):
    module_name = "gradcli_user_model_" + hashlib.sha1(path.encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise BadInputError(f"cannot import {path} as Python; give a .py file in --model")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so that classes defined there can be pickled
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise BadInputError(f"importing {path} failed: {_one_line(err)}") from err
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise BadInputError(
            f"cannot import module {name!r} ({_one_line(err)}); check the name and that its "
            "package is installed or on PYTHONPATH"
        ) from err
    except Exception as err:
        raise BadInputError(f"importing module {name!r} failed: {_one_line(err)}") from err


def _call_factory(python_module, attr: str, spec: str, num_classes: int | None) -> nn.Module:
    factory = python_module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise BadInputError(
                f"{spec.rpartition(':')[0]} has no {attr!r}; check the factory name after ':' "
                "in --model"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise BadInputError(
            f"{attr} in --model {spec} is a {type(factory).__name__}, not a callable that "
            "returns an nn.Module"
        )
    kwargs = {}
    if num_classes is not None:
        if not _accepts_keyword(factory, "num_classes"):
            raise BadInputError(
                f"factory {attr} takes no num_classes argument; drop --num-classes or add it"
            )
        kwargs["num_classes"] = int(num_classes)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise BadInputError(f"calling {attr}() from {spec} failed: {_one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"{attr}() from {spec} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepts_keyword(func: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell; let the call decide
    return any(
        p.name == name
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


def _build_torchscript(spec: str, weights: str | None, trust: bool) -> _Built:
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise BadInputError(f"model file {path} not found; check the path in --model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu")
    except Exception as err:
        raise BadInputError(
            f"{path} is not a TorchScript file; give an architecture name or file.py:factory "
            "with --weights"
        ) from err
    weights_path, sha = None, sha256_file(path)
    if weights is not None:
        weights_path, state_dict, sha = _read_weights(weights, path, trust)
        _load_state_dict_checked(module, state_dict, path, weights_path)
    return _Built(module, path, weights_path, sha, None)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _looks_like_path(weights: str) -> bool:
    return (
        os.path.exists(weights)
        or "/" in weights
        or os.sep in weights
        or bool(os.path.splitext(weights)[1].lower() in {".pt", ".pth", ".bin", ".ckpt", ".tar"})
    )


def _existing_weights_file(weights: str, model: str) -> str:
    path = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        hint = ""
        if not _looks_like_path(weights):
            hint = " (weights names such as IMAGENET1K_V1 apply to torchvision architectures only)"
        raise BadInputError(f"weights file {path} for {model} not found{hint}; check --weights")
    return path


def _read_weights(weights: str, model: str, trust: bool) -> tuple[str, dict, str]:
    """The file --weights names for ``model``: its absolute path, state dict and sha256."""
    path = _existing_weights_file(weights, model)
    return path, load_checkpoint(path, trust), sha256_file(path)


def load_checkpoint(path: str, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file → its state_dict (name → tensor), ``module.`` prefix removed.

    Accepts a bare state_dict, a dict holding one under ``state_dict``/``model``/``net``/
    ``model_state_dict``, a whole pickled ``nn.Module`` (only with ``trust_checkpoint``), or a
    TorchScript archive. Without ``trust_checkpoint`` only tensors and plain containers unpickle.
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        unsafe = [] if trust_checkpoint else _unsafe_globals(path)
        if unsafe:
            raise BadInputError(
                f"checkpoint {path} needs full unpickling (of {_first_few(unsafe, 3)}), which "
                "can run arbitrary code; re-save it as a plain state_dict or pass "
                "--trust-checkpoint if you trust its source"
            ) from err
        raise BadInputError(
            f"cannot read checkpoint {path} ({_unpickling_reason(err)}); pass a file saved with "
            "torch.save"
        ) from err
    except Exception as err:
        obj = _try_torchscript_state_dict(path)
        if obj is None:
            raise BadInputError(
                f"cannot read checkpoint {path} ({_one_line(err)}); pass a file saved with "
                "torch.save"
            ) from err
    return _extract_state_dict(obj, path)


def _unsafe_globals(path: str) -> list[str]:
    """Names of the Python objects a checkpoint's pickle would import (empty if unreadable)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _try_torchscript_state_dict(path: str) -> dict | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        return None


def _extract_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and any(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise BadInputError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict; "
            "save model.state_dict() instead"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(str(k) for k in list(obj)[:5])
        raise BadInputError(
            f"checkpoint {path} holds no tensors (keys: {keys}); save model.state_dict() instead"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _num_classes_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> int | None:
    """Output width the checkpoint's last layer has when it differs from the model's.

    Classification networks register their classifier last, so the last parameter (the
    classifier's bias or weight) has one row per class.
    """
    names = [name for name, _ in model.named_parameters()]
    if not names:
        return None
    last = names[-1]
    expected = dict(model.named_parameters())[last]
    found = state_dict.get(last)
    if found is None or found.dim() == 0 or expected.dim() == 0:
        return None
    if found.shape[1:] != expected.shape[1:] or found.shape[0] == expected.shape[0]:
        return None
    return int(found.shape[0])


def _load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str, weights: str | None
) -> None:
    """Load strictly, with a message that lists what does not match."""
    expected = model.state_dict()
    # Checkpoints from before BatchNorm counted batches lack this buffer; eval mode ignores it.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_first_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_first_few(unexpected)}")
        if mismatched:
            parts.append(
                f"shape mismatches checkpoint vs model ({len(mismatched)}): "
                f"{_first_few(mismatched)}"
            )
        raise BadInputError(
            f"the weights {weights} do not match the architecture {model_name} "
            f"({'; '.join(parts)}); check --model and --weights"
        )
    model.load_state_dict(state_dict, strict=False)


def _first_few(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def _unpickling_reason(err: BaseException) -> str:
    """The specific reason in torch's weights-only error (e.g. 'Unsupported operand 149'),
    not its advice to turn the safety off."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        if detail and detail[0].strip():
            return f"not a plain checkpoint: {detail[0].strip()}"
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Preprocessing, feature layer, device
# --------------------------------------------------------------------------------------------


def _first_conv_in_channels(module: nn.Module) -> int | None:
    for _, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels)
        if _is_script_module(sub) and getattr(sub, "original_name", "") == "Conv2d":
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 4:
                return int(weight.shape[1] * int(getattr(sub, "groups", 1)))
    return None


def _default_preprocess(module: nn.Module, mean: Sequence[float] | None) -> Preprocess:
    """For factories and TorchScript: images at their stored size, channels from the first
    Conv2d."""
    channels = _first_conv_in_channels(module)
    if channels is None:
        channels = len(mean) if mean is not None and len(mean) in (1, 3) else 3
    if channels == 1:
        return Preprocess(None, 1, (0.5,), (0.5,))
    if channels == 3:
        return Preprocess(None, 3, IMAGENET_MEAN, IMAGENET_STD)
    raise BadInputError(f"models must take 1 or 3 input channels, not {channels}")


def _override_preprocess(
    base: Preprocess,
    input_size: tuple[int, int] | int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    resize_to: int | None = None,
    resize_rounding: str = "uint8",
) -> Preprocess:
    """Apply user overrides; a resize-then-crop recipe keeps its resize/crop ratio unless
    ``resize_to`` sets the shorter side explicitly."""
    size, resize = base.input_size, base.resize
    if input_size is not None:
        if isinstance(input_size, int):
            size = (input_size, input_size)
        else:
            values = tuple(int(v) for v in input_size)
            if len(values) == 1:
                values = values * 2
            if len(values) != 2:
                raise BadInputError(
                    f"--input-size takes one size or height,width, not {len(values)} values"
                )
            size = values
        if resize is not None and base.input_size is not None:
            resize = round(resize * min(size) / min(base.input_size))
    if resize_to is not None:
        resize = int(resize_to)
    return Preprocess(
        input_size=size,
        channels=base.channels,
        mean=tuple(float(m) for m in mean) if mean is not None else base.mean,
        std=tuple(float(s) for s in std) if std is not None else base.std,
        resize=resize,
        resize_rounding=resize_rounding,
    )


def _is_script_module(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _is_linear(module: nn.Module) -> bool:
    if _is_script_module(module):
        return getattr(module, "original_name", "") == "Linear"
    return isinstance(module, nn.Linear)


def _submodule(root: nn.Module, name: str) -> nn.Module:
    # get_submodule is not available on ScriptModules
    return dict(root.named_modules())[name]


def _resolve_feature_layer(module: nn.Module, feature_layer: str | None, spec: str) -> str:
    names = [name for name, _ in module.named_modules() if name]
    if feature_layer is not None:
        if feature_layer not in names:
            raise BadInputError(
                f"model {spec} has no layer {feature_layer!r}; the last ones are "
                f"{', '.join(names[-6:])} ({len(names)} in all)"
            )
        return feature_layer
    linears = [name for name, sub in module.named_modules() if name and _is_linear(sub)]
    if not linears:
        raise BadInputError(
            f"model {spec} has no nn.Linear layer to read features from; pass --feature-layer "
            f"NAME (the last layers are {', '.join(names[-4:])})"
        )
    return linears[-1]


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """The feature layer as an ``nn.Linear``, else None.

    A scripted linear layer is mirrored by an ``nn.Linear`` whose parameters share its
    storage (a forward-only view: gradients through it do not reach the scripted module).
    """
    if isinstance(module, nn.Linear):
        return module
    if not (_is_script_module(module) and _is_linear(module)):
        return None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype
    )
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _check_sequential_path(root: nn.Module, layer: str, spec: str) -> None:
    """ScriptModules take no hooks; their features can only be read by running the
    enclosing ``nn.Sequential`` containers step by step in Python."""
    parts = layer.split(".")
    modules = dict(root.named_modules())
    for depth in range(len(parts)):
        ancestor = modules[".".join(parts[:depth])]
        kind = getattr(ancestor, "original_name", type(ancestor).__name__)
        if not (isinstance(ancestor, nn.Sequential) or kind == "Sequential"):
            raise BadInputError(
                f"cannot read the input of layer {layer!r} in TorchScript model {spec}: "
                "TorchScript takes no hooks and the layer is not in an nn.Sequential chain; "
                "load it as a Python model with file.py:factory and --weights"
            )


def _run_sequential_capturing(
    module: nn.Module, path: list[str], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``nn.Sequential`` containers child by child → (input of the module at ``path``,
    output)."""
    if not path:
        return x, module(x)
    captured = None
    for name, child in module.named_children():
        if name == path[0]:
            captured, x = _run_sequential_capturing(child, path[1:], x)
        else:
            x = child(x)
    assert captured is not None
    return captured, x


def _probe(loaded: LoadedModel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a zero image: checks the preprocessing fits and measures widths.

    Without an input size (images at their stored size) the common sizes of
    :data:`_PROBE_SIZES` are tried in turn; a model that takes none of them needs
    ``--input-size``."""
    p = loaded.preprocess
    sizes = [p.input_size] if p.input_size else list(_PROBE_SIZES)
    dtype = next((t.dtype for t in loaded.module.parameters() if t.is_floating_point()), None)
    failure: Exception | None = None
    for size in sizes:
        x = torch.zeros(1, p.channels, *size, device=device, dtype=dtype or torch.float32)
        try:
            with torch.no_grad():
                return loaded.features_and_logits(x)
        except BadInputError:
            raise
        except Exception as err:
            failure = failure or err
    size = sizes[0]
    fix = "pass --input-size, --mean and --std that fit the model"
    if p.input_size is None:
        fix = "pass --input-size with the size the model takes (and --mean, --std)"
    raise BadInputError(
        f"model {loaded.spec} fails on a {p.channels}×{size[0]}×{size[1]} "
        f"input ({_one_line(failure)}); {fix}"
    ) from failure
