"""What an evaluation produced: metrics per (method, embedding) row and OOD set."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Results:
    """Metrics for every (method, embedding) row against every OOD set.

    ``rows[(method, embedding)][ood_name]`` is a dict with fpr95, auroc, aupr_in, aupr_out.
    """

    id_name: str
    ood_names: list[str]
    rows: dict[tuple[str, str], dict[str, dict[str, float]]] = field(default_factory=dict)
    convention: str = "paper"
    head_accuracy: float | None = None
    # "<method>-<embedding>" -> calibrated threshold λ and the realised acceptance at it
    calibration: dict[str, dict] = field(default_factory=dict)
    sweeps: list[dict] = field(default_factory=list)  # flat records, see gradcli.sweep
    # what the scores were computed with (alpha, ODIN settings, stage digests): results files
    # merge only the results of equal settings
    settings: dict = field(default_factory=dict)
    id_scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    ood_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def average(self, key: tuple[str, str]) -> dict[str, float]:
        """Each metric of row ``key`` (method, embedding) averaged over the OOD sets."""
        per_set = self.rows[key]
        metrics = next(iter(per_set.values())).keys()
        return {m: float(np.mean([per_set[o][m] for o in self.ood_names])) for m in metrics}

    def to_records(self) -> list[dict]:
        """One flat record per (method, embedding, OOD set), plus the averages."""
        out = []
        for (method, emb), per_set in self.rows.items():
            for ood in [*self.ood_names, "average"]:
                values = per_set[ood] if ood != "average" else self.average((method, emb))
                out.append({"method": method, "embedding": emb, "ood": ood, **values})
        return out
