"""Input preprocessing shared by several modules: size, channels, normalisation, resize."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gradcli.errors import BadInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# How resized pixels are kept: "uint8" rounds as torchvision's PIL pipeline does (Resize on
# the PIL image, then ToTensor), "float" keeps the interpolated values unrounded.
RESIZE_ROUNDINGS = ("uint8", "float")


@dataclass(frozen=True)
class Preprocess:
    """How raw uint8 images become model inputs.

    ``input_size``: the (height, width) fed to the model; ``None`` feeds every image at its
    stored size (all images of a dataset must then share one size). ``resize``: shorter side
    is resized to this many pixels before a centre crop to ``input_size`` (the torchvision
    ImageNet recipe); ``None`` resizes straight to ``input_size`` when the image size
    differs. ``channels`` is 1 or 3: grey images are replicated to 3 channels and colour
    images converted to luminance for 1-channel models. ``resize_rounding``: ``"uint8"``
    rounds resized pixels to 8 bits as PIL does (torchvision's ``Resize`` on PIL images, then
    ``ToTensor``), ``"float"`` keeps the interpolated floats.
    """

    input_size: tuple[int, int] | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    resize_rounding: str = "uint8"

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
        if self.input_size is not None and min(self.input_size) < 1:
            raise BadInputError("--input-size must be positive")
        if self.input_size is None and self.resize is not None:
            raise BadInputError(
                f"--resize {self.resize} needs --input-size (the size of the centre crop)"
            )
        if self.resize is not None and self.resize < 1:
            raise BadInputError(f"--resize must be positive, not {self.resize}")
        if self.resize_rounding not in RESIZE_ROUNDINGS:
            raise BadInputError(
                f"--resize-rounding must be one of {', '.join(RESIZE_ROUNDINGS)}, "
                f"not '{self.resize_rounding}'"
            )

    def to_dict(self) -> dict:
        """JSON-able form, recorded in the store."""
        d = asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size is not None else None
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, record: dict) -> Preprocess:
        """The inverse of :meth:`to_dict`; records made before ``resize_rounding`` existed
        resized in float."""
        size = record.get("input_size")
        return cls(
            input_size=tuple(int(v) for v in size) if size is not None else None,
            channels=int(record["channels"]),
            mean=tuple(float(m) for m in record["mean"]),
            std=tuple(float(s) for s in record["std"]),
            resize=record.get("resize"),
            resize_rounding=record.get("resize_rounding", "float"),
        )

    def summary(self) -> dict:
        """The JSON-able form plus a one-line ``text``, for command summaries."""
        return {**self.to_dict(), "text": self.describe()}

    def describe(self) -> str:
        """One line for summaries: size, resize rule, rounding, mean/std."""
        numbers = ",".join
        norm = (
            f"mean {numbers(f'{m:g}' for m in self.mean)} std {numbers(f'{s:g}' for s in self.std)}"
        )
        if self.input_size is None:
            return f"stored size (no resize), {norm}"
        size = f"{self.input_size[0]}x{self.input_size[1]}"
        if self.resize is not None:
            rule = f"shorter side to {self.resize}, centre crop {size}"
        else:
            rule = f"resized to {size}"
        return f"{rule} ({self.resize_rounding} rounding), {norm}"
