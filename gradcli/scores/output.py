"""Output-based scores: maximum softmax probability and energy."""

from __future__ import annotations

import numpy as np
import torch

from gradcli.errors import BadInputError
from gradcli.scores.base import Detector, Embedding, Readout, energy_score, readout_logits


class MSP(Detector):
    """Maximum softmax probability, ``max_c softmax(f(x))_c``.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017. Logits ``f(x)`` come from the readout
    (``classify(normalise(z))``) when one is given, else from the embedding's stored logits.
    Nothing to fit.
    """

    name = "msp"
    needs_fit = False

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        logits = readout_logits(data, readout, self.name)
        return torch.softmax(logits, dim=1).amax(dim=1).numpy()


class Energy(Detector):
    """Negative free energy, ``T·logsumexp(f(x) / T)``.

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020. Logits as
    for ``MSP``; ``temperature`` T > 0 (default 1). Nothing to fit.
    """

    name = "energy"
    option_names = ("temperature",)
    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise BadInputError(f"energy: --temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        return energy_score(readout_logits(data, readout, self.name), self.temperature)
