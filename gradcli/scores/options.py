"""Options of the fitted detectors: one record, kept with every detector it configured."""

from __future__ import annotations

from dataclasses import dataclass

from gradcli.errors import BadInputError


@dataclass
class DetectorOptions:
    """Options of the fitted detectors, recorded with them."""

    react_percentile: float = 90.0
    bats_lambda: float = 1.0
    clip_dims: int | None = None
    knn_k: int = 50
    temperature: float = 1.0
    vim_dim: int | None = None
    gradnorm_temperature: float = 1.0
    knn_normalise: bool = True
    # ReAct/BATS on gradients: "paper" (the last d dims, d = clip_dims or K // 2, one ReAct
    # threshold pooled over them) or "per-dim" (every dim at its own percentile)
    clip_rule: str = "paper"

    def __post_init__(self) -> None:
        # Checked before any embedding is computed; named as fit-head's options.
        if self.clip_rule not in ("paper", "per-dim"):
            raise BadInputError(f"--clip-rule must be paper or per-dim, not {self.clip_rule!r}")
        if self.knn_k < 1:
            raise BadInputError(f"--knn-k must be at least 1, not {self.knn_k}")
        if not 0 < self.react_percentile <= 100:
            raise BadInputError(
                f"--react-percentile must be in (0, 100], not {self.react_percentile}"
            )

    def for_method(self, method: str) -> dict:
        """The options of ``method``'s detector, by its own parameter names."""
        table = {
            "energy": {"temperature": self.temperature},
            "react": {
                "percentile": self.react_percentile,
                "clip_dims": self.clip_dims,
                "rule": self.clip_rule,
            },
            "bats": {"lam": self.bats_lambda, "clip_dims": self.clip_dims, "rule": self.clip_rule},
            "knn": {"k": self.knn_k, **({} if self.knn_normalise else {"normalise": False})},
            "vim": {"dim": self.vim_dim},
            "gradnorm": {"temperature": self.gradnorm_temperature},
        }
        return table.get(method, {})
