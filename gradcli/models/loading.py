"""``load_model``: a model spec → a ``LoadedModel``, dispatched to the family that builds it.

Checks the spec and options, picks the family (factory, built-in, torchvision, TorchScript, in
that order), then applies the preprocessing defaults and overrides, moves the module to its
device, chooses the feature layer and probes one forward pass. ``list_models`` names the
built-in and torchvision models. The one module that knows every family; the families know
nothing of each other.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

import torch
from torch import nn

from gradcli.config import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from gradcli.distributed import parse_device
from gradcli.errors import BadInputError
from gradcli.models.architectures import _BUILTINS, _build_builtin
from gradcli.models.loaded import (
    LoadedModel,
    _as_linear,
    _check_sequential_path,
    _is_script_module,
    _probe,
    _resolve_feature_layer,
    _submodule,
)
from gradcli.models.user import (
    TORCHSCRIPT_SUFFIXES,
    _build_factory,
    _build_torchscript,
    _is_factory_spec,
)
from gradcli.models.zoo import _build_torchvision, _torchvision_names


def list_models() -> list[str]:
    """Built-in model names: this package's networks, then torchvision classification models."""
    return list(_BUILTINS) + sorted(_torchvision_names())


# The ID training set each built-in network's benchmark uses, by its number of classes.
_BUILTIN_ID_TRAIN = {
    "cifar_resnet18": {10: "cifar10:train", 100: "cifar100:train"},
    "wrn28_10": {10: "cifar10:train", 100: "cifar100:train"},
    "mnist_cnn": {10: "mnist5k:train"},
}
IMAGENET_ID_TRAIN = "imagenet:train"


def default_id_train(model: LoadedModel) -> str | None:
    """The ID training set of a model's benchmark, when its family says which: ImageNet for
    torchvision architectures (a local weights file with C classes reads C class folders of
    ``imagenet/train``), CIFAR-10/100 for the CIFAR networks, MNIST for ``mnist_cnn``; None
    for user factories and TorchScript files."""
    if model.spec in _BUILTIN_ID_TRAIN:
        return _BUILTIN_ID_TRAIN[model.spec].get(model.num_classes)
    if model.spec in _torchvision_names():
        return IMAGENET_ID_TRAIN
    return None


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
