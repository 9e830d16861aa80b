"""Input preprocessing shared by several modules: size, channels, normalisation, resize."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gradcli.errors import BadInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Preprocess:
    """How raw uint8 images become model inputs.

    ``resize``: shorter side is resized to this many pixels before a centre crop to
    ``input_size`` (the torchvision ImageNet recipe); ``None`` resizes straight to
    ``input_size`` when the image size differs. ``channels`` is 1 or 3: grey images are
    replicated to 3 channels and colour images converted to luminance for 1-channel models.
    """

    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise BadInputError(f"models must take 1 or 3 input channels, not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise BadInputError(
                f"--mean and --std need {self.channels} values each (one per input channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise BadInputError("--std values must be positive")
        if min(self.input_size) < 1:
            raise BadInputError("--input-size must be positive")

    def to_dict(self) -> dict:
        """JSON-able form, recorded in the store."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d
