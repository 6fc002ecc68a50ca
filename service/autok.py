"""`encoder_interval: "auto"`: the service picks K per request within the quality budget the model card publishes,
raising it only when the latency target is at risk.

- `QualityBudget`: from the card's sweep (rows at the card's default steps and guidance), FID(K) / FID(K = 1) per K;
  the Ks whose ratio is within DUALRATE_QUALITY_BUDGET are allowed.
- `CostModel`: seconds per light-network row and per encoder row, fitted online from the ticks (tick time = a x light
  rows + b x encoder rows, recursive least squares with forgetting), and the completed images per second.
- `AutoK.choose`: at submission, the smallest allowed K (best quality) whose predicted latency meets the target:
  predicted latency(K) = the wait for a slot (images ahead / throughput, throughput scaled by how much cheaper K makes
  an image than the running mix) + the request's own steps at the current tick time, scaled likewise. If no K meets
  it, the largest allowed. K is chosen once per request and kept for its whole trajectory (not changed at refresh
  boundaries: the quality of a mid-trajectory change was not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QualityBudget:
    fid_ratio: dict[int, float]  # K -> FID(K) / FID(K = 1), from the card
    budget: float

    @classmethod
    def from_card(cls, card: dict, budget: float, default_k: int) -> QualityBudget:
        d = card.get("defaults", {})
        rows = [r for r in card.get("quality", {}).get("sweep", [])
                if r.get("encoder_interval") and r.get("fid") and r.get("steps") == d.get("steps")
                and r.get("guidance_scale") == d.get("guidance_scale")]
        base = next((r["fid"] for r in rows if r["encoder_interval"] == 1), None)
        if base is None:  # no published sweep: only the card's default K is known to be acceptable
            return cls({default_k: 1.0}, budget)
        return cls({int(r["encoder_interval"]): r["fid"] / base for r in rows}, budget)

    @property
    def allowed(self) -> list[int]:
        return sorted(k for k, r in self.fid_ratio.items() if r <= self.budget) or [min(self.fid_ratio)]


@dataclass
class CostModel:
    """Per-row costs from the ticks, and the completion rate. Starts from equal costs until ticks arrive."""

    forget: float = 0.98
    theta: np.ndarray = field(default_factory=lambda: np.array([1e-3, 1e-3]))  # seconds per light row, encoder row
    p: np.ndarray = field(default_factory=lambda: np.eye(2) * 1e6)
    images_per_s: float = 0.0
    tick_s: float = 0.0

    def observe_tick(self, light_rows: int, encoder_rows: int, seconds: float, images_done: int) -> None:
        x = np.array([float(light_rows), float(encoder_rows)])
        if x.sum() > 0:
            px = self.p @ x
            gain = px / (self.forget + x @ px)
            self.theta = np.maximum(self.theta + gain * (seconds - x @ self.theta), 1e-6)
            self.p = (self.p - np.outer(gain, px)) / self.forget
            self.tick_s = 0.9 * self.tick_s + 0.1 * seconds if self.tick_s else seconds
        if seconds > 0:
            rate = images_done / seconds
            self.images_per_s = 0.98 * self.images_per_s + 0.02 * rate

    def image_cost(self, steps: int, k: int, rows: int = 1) -> float:
        """Seconds of batch time one image takes at interval k (rows: 2 for a guided image)."""
        light, enc = self.theta
        return rows * (steps * light + math.ceil(steps / k) * enc)


@dataclass
class AutoK:
    budget: QualityBudget
    target_s: float
    cost: CostModel = field(default_factory=CostModel)

    def predict(self, k: int, steps: int, images_ahead: int, free_slots: int, mix_cost: float) -> float:
        """Predicted latency of a request at interval k. mix_cost: mean image cost of the running batch (same steps)."""
        scale = self.cost.image_cost(steps, k) / mix_cost if mix_cost > 0 else 1.0
        waiting = max(0, images_ahead - free_slots)
        rate = self.cost.images_per_s / scale if self.cost.images_per_s > 0 else 0.0
        wait = waiting / rate if rate > 0 else 0.0
        return wait + steps * self.cost.tick_s * scale

    def choose(self, steps: int, images_ahead: int, free_slots: int, mix_cost: float) -> int:
        allowed = [k for k in self.budget.allowed if k <= steps] or [1]
        for k in allowed:
            if self.predict(k, steps, images_ahead, free_slots, mix_cost) <= self.target_s:
                return k
        return allowed[-1]
