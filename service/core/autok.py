"""`encoder_interval: "auto"`: the service picks K per request within the quality budget the model card publishes,
raising it only when the latency target is at risk.

- `QualityBudget`: from the card's sweep (rows at the card's default steps and guidance), FID(K) / FID(K = 1) per K
  (per seed set and averaged, where the card has its seed sets' FIDs); auto may use the card's default K and the
  larger Ks whose ratio is within DUALRATE_QUALITY_BUDGET.
- `CostModel`: seconds per light-network row and per encoder row, fitted online from the ticks (tick time = a x light
  rows + b x encoder rows, plus a per-call overhead each; ridge least squares over a window of recent ticks), and
  the image-steps per second (Retry-After).
- `AutoK.choose`: at submission, the smallest allowed K (the default when nothing is at risk) that the recent
  arrival rate can sustain
  (arrival rate x an image's cost at K <= 0.85) and whose predicted latency meets the target: the wait for a slot
  (the images ahead at K's cost) + the request's own steps at the current tick time, scaled by K's cost against the
  running mix. Otherwise the smallest sustainable K while no images wait, else the largest allowed. K is chosen once
  per request and kept for its whole trajectory (docs/overload.md: why not at refresh boundaries).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dualrate.checkpoint import distilled_schedule


@dataclass(frozen=True)
class QualityBudget:
    fid_ratio: dict[int, float]  # K -> FID(K) / FID(K = 1), from the card
    budget: float
    default_k: int = 1  # the card's default: auto never goes below it (no load, no change from the default)
    fid_ratio_std: dict[int, float] = field(default_factory=dict)  # K -> its spread over the card's seed sets

    @classmethod
    def from_card(cls, card: dict, budget: float, default_k: int) -> QualityBudget:
        """Where the card's rows carry one FID per seed set (`fids`, the same seed sets for every row), the ratio is
        taken per seed set and averaged: the sets' own difficulty cancels (on the shipped card K = 8 is 1.13 +- 0.04
        times K = 1 paired, against FIDs of 14.65 +- 1.63 and 13.03 +- 1.92 apart). Else the ratio of the means."""
        d = card.get("defaults", {})
        rows = [r for r in card.get("quality", {}).get("sweep", [])
                if r.get("encoder_interval") and r.get("fid") and r.get("steps") == d.get("steps")
                and r.get("guidance_scale") == d.get("guidance_scale")]
        distilled = distilled_schedule(card)
        if distilled is not None:  # a few-step student: never a rarer encoder than it was distilled with
            rows = [r for r in rows if int(r["encoder_interval"]) <= distilled[1]]
        base = next((r for r in rows if r["encoder_interval"] == 1), None)
        if base is None:  # no published sweep: only the card's default K is known to be acceptable
            return cls({default_k: 1.0}, budget, default_k)
        ratio, spread = {}, {}
        for r in rows:
            k, fids, base_fids = int(r["encoder_interval"]), r.get("fids") or [], base.get("fids") or []
            if len(fids) > 1 and len(fids) == len(base_fids):
                paired = [f / b for f, b in zip(fids, base_fids, strict=True)]
                ratio[k], spread[k] = float(np.mean(paired)), float(np.std(paired, ddof=1))
            else:
                ratio[k] = r["fid"] / base["fid"]
        return cls(ratio, budget, default_k, spread)

    @property
    def allowed(self) -> list[int]:
        """The Ks auto may use: the card's default and the larger ones within the budget."""
        within = [k for k, r in self.fid_ratio.items() if r <= self.budget and k >= self.default_k]
        return sorted(set(within) | {self.default_k})


@dataclass
class CostModel:
    """What a tick costs, fitted from the last ticks: seconds = c0 + a x light rows + (c1 + b x encoder rows if any
    row is refreshed). c0 and c1 are per call (launch and framework overhead), a and b per row; fitting the overhead
    apart keeps small, overhead-bound ticks (light load) from inflating the per-row costs. Solved by ridge least
    squares over a window of ticks every `refit_every` ticks; starts from `prior` until then."""

    slots: int = 16
    window: int = 400
    refit_every: int = 25
    prior: tuple[float, float, float, float] = (1e-3, 1e-4, 1e-3, 1e-4)  # c0, a, c1, b (seconds)
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tick_s: float = 0.0  # seconds per tick (EMA)
    rate_window_s: float = 20.0  # image-steps per second over about this much tick time (Retry-After)
    _steps: deque[tuple[int, float]] = field(default_factory=deque)  # (images advanced, seconds) per tick
    _steps_sum: tuple[int, float] = (0, 0.0)
    _x: deque[tuple[float, float, float, float]] = field(default_factory=deque)
    _y: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.theta.size == 0:
            self.theta = np.array(self.prior)

    def observe_tick(self, light_rows: int, encoder_rows: int, seconds: float, images_advanced: int) -> None:
        """One tick: its rows per network and time (the fitted tick cost), and the images it advanced one step (the
        throughput behind Retry-After)."""
        if images_advanced:
            n, t = self._steps_sum
            self._steps.append((images_advanced, seconds))
            n, t = n + images_advanced, t + seconds
            while len(self._steps) > 1 and t - self._steps[0][1] >= self.rate_window_s:
                old_n, old_t = self._steps.popleft()
                n, t = n - old_n, t - old_t
            self._steps_sum = (n, t)
        if light_rows + encoder_rows > 0:
            self._x.append((1.0, float(light_rows), float(encoder_rows > 0), float(encoder_rows)))
            self._y.append(seconds)
            if len(self._x) > self.window:
                self._x.popleft()
                self._y.popleft()
            if len(self._x) % self.refit_every == 0 or len(self._x) == self.window:
                self._refit()
            self.tick_s = 0.9 * self.tick_s + 0.1 * seconds if self.tick_s else seconds

    @property
    def steps_per_s(self) -> float:
        """Image-steps per second of tick time over the last ~rate_window_s: a busy service's throughput in the unit
        its queue is measured in (a tick advances every active image one step), smooth where completions come in
        waves."""
        n, t = self._steps_sum
        return n / t if t > 0 else 0.0

    def _refit(self) -> None:
        x, y = np.array(self._x), np.array(self._y)
        prior = np.array(self.prior)
        lam = 1e-6 * len(y)  # a light pull toward the prior where the ticks do not tell the terms apart
        theta = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ y + lam * prior)
        self.theta = np.maximum(theta, 0.0)

    def image_cost(self, steps: int, k: int, rows: int = 1) -> float:
        """Seconds of service time one image takes at interval k with the batch full (rows: 2 for a guided image):
        its rows' share of every tick, the per-call overheads split over the slots."""
        c0, a, c1, b = self.theta
        return steps * (rows * a + c0 / self.slots) + math.ceil(steps / k) * (rows * b + c1 / self.slots)


@dataclass
class AutoK:
    budget: QualityBudget
    target_s: float
    cost: CostModel = field(default_factory=CostModel)
    max_utilisation: float = 0.85  # the arrival rate may use at most this share of the capacity at the chosen K
    window_s: float = 5.0  # arrival rate over this window
    _arrivals: deque[tuple[float, int]] = field(default_factory=deque)

    def arrived(self, images: int, now: float) -> None:
        self._arrivals.append((now, images))
        self._forget(now)  # every request arrives here, auto or not: the window stays bounded (it grew for ever)

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - self.window_s:
            self._arrivals.popleft()

    def arrival_rate(self, now: float) -> float:
        """Images submitted per second over the last `window_s`."""
        self._forget(now)
        if not self._arrivals:
            return 0.0
        # Over the window, or over the time since the first arrival in it plus a second (a cold start's burst).
        span = min(self.window_s, now - self._arrivals[0][0] + 1.0)
        return sum(n for _, n in self._arrivals) / span

    def predict(self, k: int, steps: int, rows: int, images_ahead: int, free_slots: int, mix_cost: float) -> float:
        """Predicted latency of a request at interval k: the wait for a slot (the images ahead of it at the capacity
        of interval k) plus its own steps at the current tick time, scaled by k's cost against the running mix."""
        own = self.cost.image_cost(steps, k, rows)
        wait = max(0, images_ahead - free_slots) * own
        scale = own / mix_cost if mix_cost > 0 else 1.0
        return wait + steps * self.cost.tick_s * scale

    def utilisation(self, k: int, steps: int, rows: int, now: float) -> float:
        """The share of the service's time the current arrival rate would take if every image ran at k."""
        return self.arrival_rate(now) * self.cost.image_cost(steps, k, rows)

    def choose(self, steps: int, rows: int, images_ahead: int, free_slots: int, mix_cost: float, now: float) -> int:
        """The smallest allowed K (the card's default first) that the arrival rate can sustain (utilisation <= max_utilisation)
        and whose predicted latency meets the target; else the smallest sustainable one; else the largest allowed."""
        allowed = [k for k in self.budget.allowed if k <= steps] or [1]
        sustainable = [k for k in allowed if self.utilisation(k, steps, rows, now) <= self.max_utilisation]
        for k in sustainable:
            if self.predict(k, steps, rows, images_ahead, free_slots, mix_cost) <= self.target_s:
                return k
        return sustainable[0] if sustainable and images_ahead <= free_slots else allowed[-1]
