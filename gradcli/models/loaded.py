"""The loaded model: an eval-mode module with a named feature layer, split into (features, logits).

``LoadedModel`` is what ``load_model`` returns and what every stage scores with; ``_Built`` is
what a model family's builder hands to ``load_model`` before the feature layer is chosen. The
feature-layer machinery (forward pre-hooks, and stepping ``nn.Sequential`` chains for
TorchScript modules, which take no hooks) and the zero-image probe live here because they act on
any module, whichever family built it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradcli.config import Preprocess
from gradcli.errors import BadInputError
from gradcli.models.checkpoints import _one_line

# Without an input size (images at their stored size) the probe tries these sizes in turn:
# any size for a fully convolutional model, or the one size a fixed-size model takes.
_PROBE_SIZES = ((224, 224), (32, 32), (28, 28), (64, 64), (96, 96), (299, 299), (8, 8))


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


@dataclass
class _Built:
    module: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None
    preprocess: Preprocess | None  # None: derive the default from the module


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
