"""Tests for gradcli.models: model specs, weights loading, feature/logit split, preprocessing."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gradcli.config import CIFAR_MEAN, IMAGENET_MEAN, IMAGENET_STD
from gradcli.errors import BadInputError
from gradcli.models import (
    MnistCNN,
    list_models,
    load_model,
    sha256_file,
)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _random_mnist_state_dict(seed: int, num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MnistCNN(num_classes).state_dict()


def _mnist_input(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Built-in networks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_cifar_resnet18():
    return load_model("cifar_resnet18")


@pytest.fixture(scope="module")
def loaded_wrn28_10():
    return load_model("wrn28_10")


def test_builtin_parameter_counts_match_the_reference_implementations(
    loaded_cifar_resnet18, loaded_wrn28_10
):
    # Published counts of kuangliu/pytorch-cifar ResNet18 and xternalz WRN-28-10 at 10 classes.
    assert _num_params(loaded_cifar_resnet18.module) == 11_173_962
    assert _num_params(loaded_wrn28_10.module) == 36_479_194
    assert loaded_wrn28_10.describe()["num_parameters"] == 36_479_194
    # conv 1→16, conv 16→32, linear 1568→64, linear 64→10 (weights + biases)
    assert _num_params(MnistCNN()) == (9 * 16 + 16) + (9 * 16 * 32 + 32) + (1568 * 64 + 64) + 650


def test_builtin_state_dict_keys_follow_the_reference_naming(
    loaded_cifar_resnet18, loaded_wrn28_10
):
    resnet_keys = set(loaded_cifar_resnet18.module.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "linear.weight", "linear.bias"} <= resnet_keys
    assert "layer2.0.shortcut.0.weight" in resnet_keys  # projection conv of a downsampling block
    assert "layer2.0.shortcut.1.running_var" in resnet_keys
    assert "layer1.0.shortcut.0.weight" not in resnet_keys  # identity shortcut has no params
    wrn_keys = set(loaded_wrn28_10.module.state_dict())
    assert {"conv1.weight", "bn1.weight", "fc.weight", "fc.bias"} <= wrn_keys
    assert "block1.layer.0.convShortcut.weight" in wrn_keys
    assert "block1.layer.1.convShortcut.weight" not in wrn_keys
    assert "block3.layer.3.conv2.weight" in wrn_keys  # 4 blocks per stage at depth 28
    assert "block3.layer.4.conv2.weight" not in wrn_keys


@pytest.mark.parametrize(
    ("name", "channels", "size", "feature_dim", "feature_layer"),
    [
        ("mnist_cnn", 1, 28, 64, "fc"),
        ("cifar_resnet18", 3, 32, 512, "linear"),
        ("wrn28_10", 3, 32, 640, "fc"),
    ],
)
def test_builtin_loads_with_shapes_and_recipe(
    request, name, channels, size, feature_dim, feature_layer
):
    loaded = load_model(name) if name == "mnist_cnn" else request.getfixturevalue(f"loaded_{name}")
    assert not loaded.module.training
    assert loaded.feature_layer == feature_layer
    assert loaded.num_classes == 10
    assert loaded.feature_dim == feature_dim
    assert loaded.preprocess.input_size == (size, size)
    assert loaded.preprocess.channels == channels
    assert loaded.preprocess.resize is None
    if name != "mnist_cnn":
        assert loaded.preprocess.mean == CIFAR_MEAN
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
    assert features.shape == (2, feature_dim) and features.dtype == torch.float32
    assert logits.shape == (2, 10)


def test_cifar_resnet18_features_and_logits_match_a_manual_forward(loaded_cifar_resnet18):
    loaded = loaded_cifar_resnet18
    net = loaded.module
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        out = F.relu(net.bn1(net.conv1(x)))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(out)))))
                out = F.relu(branch + block.shortcut(out))
        manual_features = out.mean(dim=(2, 3))
        manual_logits = manual_features @ net.linear.weight.T + net.linear.bias
    assert loaded.classifier is net.linear
    torch.testing.assert_close(features, manual_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, manual_logits, rtol=1e-5, atol=1e-5)


def test_wrn28_10_features_and_logits_match_a_manual_forward(loaded_wrn28_10):
    loaded = loaded_wrn28_10
    net = loaded.module
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        out = net.conv1(x)
        for stage in (net.block1, net.block2, net.block3):
            for block in stage.layer:
                activated = F.relu(block.bn1(out))
                branch = block.conv2(F.relu(block.bn2(block.conv1(activated))))
                shortcut = out if block.convShortcut is None else block.convShortcut(activated)
                out = shortcut + branch
        manual_features = F.relu(net.bn1(out)).mean(dim=(2, 3))
    torch.testing.assert_close(features, manual_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, manual_features @ net.fc.weight.T + net.fc.bias)


def test_num_classes_argument_sets_the_output_width():
    loaded = load_model("mnist_cnn", num_classes=7)
    assert loaded.num_classes == 7 and loaded.module.fc.out_features == 7
    assert loaded.features_and_logits(_mnist_input())[1].shape == (3, 7)


def test_features_and_logits_under_inference_mode_and_with_grad():
    loaded = load_model("mnist_cnn")
    x = _mnist_input()
    with torch.inference_mode():
        features_inf, logits_inf = loaded.features_and_logits(x)
    features, logits = loaded.features_and_logits(x)
    assert features.requires_grad and logits.requires_grad
    torch.testing.assert_close(features.detach(), features_inf)
    torch.testing.assert_close(logits.detach(), logits_inf)
    # Logits are the classifier applied to the features, so the gradient flows through both.
    torch.testing.assert_close(loaded.classifier(features), logits)
    torch.logsumexp(logits, dim=1).sum().backward()
    assert loaded.module.fc.weight.grad is not None
    assert loaded.module.features[0].weight.grad.abs().sum() > 0
    # no hook is left behind
    assert not loaded.module.fc._forward_pre_hooks


def test_describe_is_json_able_and_counts_parameters():
    loaded = load_model("mnist_cnn")
    described = json.loads(json.dumps(loaded.describe()))
    assert described["architecture"] == "MnistCNN"
    assert described["num_parameters"] == _num_params(MnistCNN())
    assert described["preprocess"]["mean"] == [0.1307]
    assert described["num_classes"] == 10 and described["feature_layer"] == "fc"


def test_list_models_and_unknown_name():
    names = list_models()
    for name in ("cifar_resnet18", "wrn28_10", "mnist_cnn", "resnet18", "vit_b_16", "resnet50"):
        assert name in names
    with pytest.raises(BadInputError, match="did you mean resnet18"):
        load_model("resnt18")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_state_dict_with_dataparallel_prefix_round_trips(tmp_path):
    reference = MnistCNN()
    reference.load_state_dict(_random_mnist_state_dict(seed=3))
    reference.eval()
    path = tmp_path / "ckpt.pth"
    # kuangliu-style checkpoint: {'net': DataParallel state_dict, 'acc': ..., 'epoch': ...}
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"net": wrapped, "acc": 91.5, "epoch": 7}, path)

    loaded = load_model("mnist_cnn", str(path))
    x = _mnist_input()
    with torch.no_grad():
        _, logits = loaded.features_and_logits(x)
        expected = reference(x)
    torch.testing.assert_close(logits, expected)
    assert loaded.weights == str(path) and os.path.isabs(loaded.weights)
    assert loaded.weights_sha256 == _file_sha256(path) == sha256_file(path)


def test_num_classes_is_read_from_the_checkpoint(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(_random_mnist_state_dict(seed=0, num_classes=5), path)
    loaded = load_model("mnist_cnn", str(path))
    assert loaded.num_classes == 5
    assert loaded.module.fc.out_features == 5


def test_mismatched_state_dict_lists_the_keys(tmp_path):
    state = _random_mnist_state_dict(seed=0)
    del state["fc.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["fc1.weight"] = torch.zeros(64, 100)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(BadInputError) as info:
        load_model("mnist_cnn", str(path))
    message = str(info.value)
    assert "do not match the architecture mnist_cnn" in message
    assert "missing keys (1): fc.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "fc1.weight (64, 100) vs (64, 1568)" in message
    assert "\n" not in message


def test_missing_weights_file_and_unreadable_checkpoint(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_model("mnist_cnn", str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="cannot read checkpoint"):
        load_model("mnist_cnn", str(garbage))
    plain_pickle = tmp_path / "pickle4.pt"  # protocol 4: torch warns, then fails
    plain_pickle.write_bytes(b"\x80\x04" + b"garbage" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadInputError) as failure:
            load_model("mnist_cnn", str(plain_pickle))
    message = str(failure.value)
    assert "Unsupported operand" in message and "weights_only" not in message
    assert "\n" not in message and not caught


def test_checkpoint_needing_full_unpickling_requires_trust(tmp_path):
    state = _random_mnist_state_dict(seed=5)
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(BadInputError, match="needs full unpickling.*--trust-checkpoint"):
        load_model("mnist_cnn", str(path))
    loaded = load_model("mnist_cnn", str(path), trust_checkpoint=True)
    torch.testing.assert_close(loaded.module.fc.weight, state["fc.weight"])

    # a whole pickled module: its state_dict is used
    whole = MnistCNN()
    whole.load_state_dict(state)
    module_path = tmp_path / "whole.pt"
    torch.save(whole, module_path)
    with pytest.raises(BadInputError, match="needs full unpickling"):
        load_model("mnist_cnn", str(module_path))
    loaded = load_model("mnist_cnn", str(module_path), trust_checkpoint=True)
    torch.testing.assert_close(loaded.module.fc1.bias, state["fc1.bias"])


# ---------------------------------------------------------------------------------------------
# torchvision architectures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "weights", "filename"),
    [
        ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
        ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
        ("mobilenet_v2", "DEFAULT", None),
        ("densenet121", "DEFAULT", None),
        ("vit_b_16", "IMAGENET1K_V1", None),
        ("wide_resnet50_2", "DEFAULT", None),
    ],
)
def test_torchvision_weights_name_points_at_the_hub_cache(
    tmp_path, monkeypatch, arch, weights, filename
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if filename is None:
        member = weights.rsplit(".", 1)[-1]
        url = torchvision.models.get_model_weights(arch)[member].url
        filename = url.rsplit("/", 1)[-1]
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", filename)
    with pytest.raises(BadInputError) as info:
        load_model(arch, weights)
    assert expected in str(info.value)
    assert "download" in str(info.value)


def test_torchvision_unknown_or_foreign_weights_name():
    with pytest.raises(BadInputError, match="unknown weights 'IMAGENET9K' for resnet18"):
        load_model("resnet18", "IMAGENET9K")
    with pytest.raises(BadInputError, match="not for resnet18"):
        load_model("resnet18", "ResNet50_Weights.IMAGENET1K_V1")


def test_torchvision_resnet18_from_hub_cache_and_from_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    hub_file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), hub_file)
    digest = _file_sha256(hub_file)

    by_name = load_model("resnet18", "ResNet18_Weights.IMAGENET1K_V1", input_size=64)
    assert by_name.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert by_name.weights_sha256 == digest
    assert by_name.num_classes == 1000 and by_name.feature_layer == "fc"
    # recipe from the weights' transforms: 224 crop of a 256 resize, scaled to the override
    assert by_name.preprocess.input_size == (64, 64)
    assert by_name.preprocess.resize == round(256 * 64 / 224)
    assert by_name.preprocess.mean == IMAGENET_MEAN and by_name.preprocess.std == IMAGENET_STD

    by_path = load_model("resnet18", str(hub_file), input_size=64)
    assert by_path.weights == str(hub_file)
    assert by_path.weights_sha256 == digest

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        for loaded in (by_name, by_path):
            features, logits = loaded.features_and_logits(x)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            assert features.shape == (2, 512)


def test_torchvision_default_recipe_and_small_mobilenet():
    loaded = load_model("mobilenet_v2", input_size=(48, 64), num_classes=3, random_weights=True)
    assert loaded.describe()["random_weights"] is True
    assert loaded.feature_layer == "classifier.1"
    assert loaded.num_classes == 3 and loaded.feature_dim == 1280
    assert loaded.preprocess.input_size == (48, 64)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        manual_features = F.adaptive_avg_pool2d(loaded.module.features(x), 1).flatten(1)
    torch.testing.assert_close(features, manual_features)
    torch.testing.assert_close(loaded.classifier(features), logits)


# ---------------------------------------------------------------------------------------------
# User factories and TorchScript
# ---------------------------------------------------------------------------------------------

_FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make(num_classes=4):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, num_classes),
        )

    def conv_only():
        return nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def not_a_module():
        return 42

    NOT_CALLABLE = 3
    """
)


def test_factory_from_a_file(tmp_path, monkeypatch):
    source = tmp_path / "user_net.py"
    source.write_text(_FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    loaded = load_model("user_net.py:make", input_size=16)
    assert loaded.spec == f"{source}:make"
    assert loaded.feature_layer == "6" and loaded.num_classes == 4 and loaded.feature_dim == 8
    # channels come from the first Conv2d; 1-channel default normalisation is (0.5,)
    assert loaded.preprocess.channels == 1 and loaded.preprocess.mean == (0.5,)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        manual_features = loaded.module[:6](x)
    torch.testing.assert_close(features, manual_features)
    torch.testing.assert_close(logits, loaded.module[6](manual_features))

    assert load_model(f"{source}:make", num_classes=6, input_size=16).num_classes == 6


def test_factory_from_a_package_with_weights(tmp_path, monkeypatch):
    package = tmp_path / "gradcli_test_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(_FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))

    torch.manual_seed(1)
    trained = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    weights = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), weights)

    loaded = load_model("gradcli_test_userpkg.nets:make", str(weights), input_size=8)
    assert loaded.spec == "gradcli_test_userpkg.nets:make"
    assert loaded.weights_sha256 == _file_sha256(weights)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features_and_logits(x)[1], trained(x))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing_factory", "has no 'missing_factory'"),
        ("NOT_CALLABLE", "not a callable"),
        ("not_a_module", "returned a int, not a torch.nn.Module"),
        ("conv_only", "has no nn.Linear layer to read features from; pass --feature-layer"),
    ],
)
def test_factory_errors(tmp_path, factory, message):
    source = tmp_path / "user_net.py"
    source.write_text(_FACTORY_SOURCE)
    with pytest.raises(BadInputError, match=message):
        load_model(f"{source}:{factory}")


def test_factory_import_errors(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_model(f"{tmp_path / 'absent.py'}:make")
    with pytest.raises(BadInputError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        load_model("no_such_pkg_xyz.mod:make")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(BadInputError, match="importing .*broken.py failed: RuntimeError: boom"):
        load_model(f"{broken}:make")


def test_model_without_linear_works_with_a_feature_layer(tmp_path):
    source = tmp_path / "user_net.py"
    source.write_text(_FACTORY_SOURCE)
    loaded = load_model(f"{source}:conv_only", feature_layer="2", input_size=9)
    assert loaded.classifier is None
    assert loaded.num_classes == 5  # measured from a forward pass
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        manual = loaded.module[1](loaded.module[0](x))
    torch.testing.assert_close(features, manual.flatten(1))
    torch.testing.assert_close(logits, manual.flatten(1))


def _script_and_save(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        torch.jit.script(module).save(str(path))


def test_torchscript_file_round_trip(tmp_path):
    torch.manual_seed(2)
    original = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 5),
    ).eval()  # fmt: skip
    path = tmp_path / "scripted.pt"
    _script_and_save(original, path)

    loaded = load_model(str(path), input_size=12)
    assert loaded.spec == str(path)
    assert loaded.weights is None and loaded.weights_sha256 == _file_sha256(path)
    assert loaded.feature_layer == "5" and loaded.num_classes == 5
    assert loaded.preprocess.channels == 3 and loaded.preprocess.mean == IMAGENET_MEAN
    assert loaded.describe()["architecture"] == "Sequential"
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        features, logits = loaded.features_and_logits(x)
        torch.testing.assert_close(logits, original(x))
        torch.testing.assert_close(features, original[:5](x))
        torch.testing.assert_close(loaded.classifier(features), logits)

    nested = load_model(str(path), feature_layer="4.0", input_size=12)
    with torch.no_grad():
        torch.testing.assert_close(nested.features_and_logits(x)[0], original[:4](x))


def test_torchscript_errors(tmp_path):
    not_script = tmp_path / "state.pt"
    torch.save(MnistCNN().state_dict(), not_script)
    with pytest.raises(BadInputError, match="is not a TorchScript file; give an architecture"):
        load_model(str(not_script))
    with pytest.raises(BadInputError, match="not found"):
        load_model(str(tmp_path / "absent.pt"))

    # a scripted model with its own forward takes no hooks: features cannot be read
    scripted = tmp_path / "mnist.pt"
    _script_and_save(MnistCNN(), scripted)
    with pytest.raises(BadInputError, match="load it as a Python model with file.py:factory"):
        load_model(str(scripted))


# ---------------------------------------------------------------------------------------------
# Feature layer and preprocessing overrides
# ---------------------------------------------------------------------------------------------


def test_feature_layer_override():
    loaded = load_model("mnist_cnn", feature_layer="fc1")
    assert loaded.classifier is loaded.module.fc1 and loaded.feature_dim == 32 * 7 * 7
    x = _mnist_input()
    with torch.no_grad():
        features, _ = loaded.features_and_logits(x)
        torch.testing.assert_close(features, loaded.module.features(x).flatten(1))

    conv = load_model("mnist_cnn", feature_layer="features.3")
    assert conv.classifier is None and conv.feature_dim == 16 * 14 * 14
    assert conv.num_classes == 10
    with torch.no_grad():
        features, _ = conv.features_and_logits(x)
        torch.testing.assert_close(features, conv.module.features[:3](x).flatten(1))

    with pytest.raises(BadInputError, match="has no layer 'head'.*fc1, fc"):
        load_model("mnist_cnn", feature_layer="head")


def test_preprocess_overrides():
    loaded = load_model("cifar_resnet18", input_size=40, mean=(0.5, 0.5, 0.5), std=[0.25] * 3)
    assert loaded.preprocess.input_size == (40, 40)
    assert loaded.preprocess.mean == (0.5, 0.5, 0.5) and loaded.preprocess.std == (0.25,) * 3
    assert loaded.preprocess.resize is None
    with pytest.raises(BadInputError, match="need 3 values each"):
        load_model("cifar_resnet18", mean=(0.5,), std=(0.5,))
    with pytest.raises(BadInputError, match="--std values must be positive"):
        load_model("mnist_cnn", std=(0.0,))
    # a size the model cannot take fails at load time with the fix in the message
    with pytest.raises(BadInputError, match="fails on a 1×8×8 input.*--input-size"):
        load_model("mnist_cnn", input_size=8)


def test_bad_num_classes_and_device():
    with pytest.raises(BadInputError, match="--num-classes must be at least 1"):
        load_model("mnist_cnn", num_classes=0)
    with pytest.raises(BadInputError, match="unknown device"):
        load_model("mnist_cnn", device="toaster")


# ---------------------------------------------------------------------------------------------
# Input size of user models, weights of torchvision models, preprocessing in summaries
# ---------------------------------------------------------------------------------------------

_RECORDING_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    LOG = {log!r}

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            with open(LOG, "a") as log:
                log.write("x".join(str(d) for d in x.shape[1:]) + "\\n")
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))

    def make():
        return Recording()
    """
)


def _recording_model(tmp_path):
    log = tmp_path / "shapes.txt"
    source = tmp_path / "recording.py"
    source.write_text(_RECORDING_SOURCE.format(log=str(log)))
    return f"{source}:make", log


def test_user_model_sees_images_at_their_stored_size(tmp_path, cli):
    import numpy as np

    spec, log = _recording_model(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "eight.npz", x=images, y=np.arange(6) % 2)
    store = tmp_path / "store"
    extract = ["extract-subspace", "--model", spec, "--dataset", f"npz:{tmp_path / 'eight.npz'}"]
    outcome = cli(*extract, "--store", store, "-q", "--json")
    assert outcome.code == 0, outcome.err
    shapes = log.read_text().split()
    assert shapes[0] == "3x224x224"  # the probe, before any data
    assert len(shapes) > 1 and set(shapes[1:]) == {"3x8x8"}  # every image fed at 8x8
    summary = outcome.json()["preprocess"]
    assert summary["input_size"] is None and summary["resize"] is None
    assert summary["text"].startswith("stored size (no resize), mean 0.485,0.456,0.406")
    # the text summary says it too, and --input-size still resizes
    log.unlink()
    again = cli(*extract, "--input-size", "12", "--store", tmp_path / "s2", "-q")
    assert again.code == 0, again.err
    assert set(log.read_text().split()[1:]) == {"3x12x12"}
    assert "preprocess: resized to 12x12 (uint8 rounding), mean 0.485" in again.out


def test_a_fixed_size_user_model_is_probed_at_its_own_size(tmp_path, cli):
    """A Flatten + Linear model takes one size only: the probe finds it, images are fed at their
    stored 28x28, and the widths come from that forward."""
    import numpy as np

    (tmp_path / "flat.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 6), nn.ReLU(),\n"
        "                         nn.Linear(6, 2))\n"
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=images, y=np.arange(8) % 2)
    outcome = cli(
        "extract-subspace",
        "--model",
        f"{tmp_path / 'flat.py'}:make",
        "--dataset",
        f"npz:{tmp_path / 'd.npz'}",
        "--store",
        tmp_path / "s",
        "-q",
        "--json",
    )
    assert outcome.code == 0, outcome.err
    loaded = load_model(f"{tmp_path / 'flat.py'}:make")
    assert (loaded.num_classes, loaded.feature_dim) == (2, 6)
    assert loaded.preprocess.input_size is None
    # a size no probe tries is still a one-line error naming --input-size
    (tmp_path / "odd.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 13 * 13, 2))\n"
    )
    with pytest.raises(BadInputError, match="pass --input-size with the size the model takes"):
        load_model(f"{tmp_path / 'odd.py'}:make")


def test_mixed_sizes_without_input_size_is_a_one_line_error(tmp_path, cli):
    import numpy as np
    from PIL import Image

    spec, _ = _recording_model(tmp_path)
    rng = np.random.default_rng(1)
    for label, side in (("a", 8), ("a", 8), ("b", 12), ("b", 8)):
        folder = tmp_path / "mixed" / label
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{len(list(folder.iterdir()))}-{side}.png")
    dataset = f"folder:{tmp_path / 'mixed'}"
    outcome = cli(
        "extract-subspace", "--model", spec, "--dataset", dataset, "--store", tmp_path / "s", "-q"
    )
    assert outcome.code != 0
    lines = [line for line in outcome.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in outcome.err, outcome.err
    assert "differ in size (8x8 and 12x12" in outcome.err and "--input-size" in outcome.err
    fixed = cli(
        "extract-subspace",
        *("--model", spec, "--dataset", dataset, "--input-size", "8"),
        *("--store", tmp_path / "s2", "-q"),
    )
    assert fixed.code == 0, fixed.err


def test_torchscript_and_factories_default_to_stored_size(tmp_path):
    spec, _ = _recording_model(tmp_path)
    assert load_model(spec).preprocess.input_size is None
    assert load_model(spec, input_size=16).preprocess.input_size == (16, 16)
    cropped = load_model(spec, input_size=16, resize=20).preprocess
    assert (cropped.input_size, cropped.resize) == ((16, 16), 20)
    with pytest.raises(BadInputError, match="--resize 20 needs --input-size"):
        load_model(spec, resize=20)


def test_zoo_models_keep_their_recipe():
    import numpy as np

    from gradcli.data import preprocess_batch

    loaded = load_model("shufflenet_v2_x0_5", random_weights=True)
    recipe = loaded.preprocess
    assert (recipe.input_size, recipe.resize) == ((224, 224), 256)
    assert (recipe.mean, recipe.std) == (IMAGENET_MEAN, IMAGENET_STD)
    image = np.random.default_rng(2).integers(0, 256, size=(1, 300, 200, 3), dtype=np.uint8)
    assert preprocess_batch(torch.from_numpy(image), recipe).shape == (1, 3, 224, 224)
    assert load_model("mnist_cnn").preprocess.input_size == (28, 28)  # built-ins too


def test_torchvision_models_need_weights_or_random_weights(tmp_path, tiny, cli):
    from gradcli.run import Run
    from gradcli.store import RunStore

    message = (
        "--model resnet18 needs --weights FILE (a local checkpoint) or --random-weights to use "
        "untrained weights"
    )
    with pytest.raises(BadInputError) as caught:
        load_model("resnet18")
    assert str(caught.value) == message
    with pytest.raises(BadInputError, match="needs --weights FILE"):
        Run(tmp_path / "py").set_model("shufflenet_v2_x0_5", num_classes=3)
    outcome = cli(
        "extract-subspace",
        *("--model", "resnet18", "--dataset", tiny.train, "--store", tmp_path / "cli"),
    )
    assert outcome.code == 2 and outcome.err.strip().splitlines() == [f"error: {message}"]
    assert not load_model("shufflenet_v2_x0_5", random_weights=True).describe().get("weights")
    with pytest.raises(BadInputError, match="both --weights and --random-weights"):
        load_model("mnist_cnn", str(tmp_path / "w.pt"), random_weights=True)
    # Untrained on purpose: it runs, and the store says so.
    ran = cli(
        "extract-subspace",
        *("--model", "shufflenet_v2_x0_5", "--random-weights", "--num-classes", "3"),
        *("--input-size", "32", "--dataset", tiny.train, "--max-samples", "12"),
        *("--store", tmp_path / "random", "-q", "--json"),
    )
    assert ran.code == 0, ran.err
    assert ran.json()["random_weights"] is True
    record = RunStore(str(tmp_path / "random")).attrs
    assert record["model"]["random_weights"] is True and record["model_args"]["random_weights"]
    assert record["model"]["preprocess"]["resize"] == round(256 * 32 / 224)
    # later stages reload the recorded model without asking again
    assert Run(tmp_path / "random").model.random_weights
    python = Run(tmp_path / "py2")
    assert python.set_model("shufflenet_v2_x0_5", num_classes=3, random_weights=True).random_weights
