"""The runner: owns the device-resident state of the batch slots and executes the scheduler's plans.

vLLM v1's split is the model: the scheduler decides (`TickPlan`), the runner executes (`Runner.run`) and reports what
happened (`TickOutcome`), the scheduler updates its bookkeeping from it. The runner holds, per slot, the current
sample z and the encoder features of the slot's conditional and unconditional rows (the feature cache), both on the
engine's device. Noise is a function of (seed, step) drawn for the whole batch on the device (`draw_noise`), so the
runner keeps no generator per image. It knows nothing of requests, queues or deadlines.

A tick: the rows due for an encoder refresh go to the encoder (`encode_async`: its own CUDA stream or worker thread)
while the light network runs the rows that reuse cached features; the due rows follow once their features are ready.
Then one `guided_step` per image (the same step function as the reference sampler). A failing network call is
retried once; if it fails again the rows are split in halves, recursively, so only the images that fail on their
own fail (`TickOutcome.failed`); the others advance as they would have alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import draw_noise, guided_step, preview_x0
from engines import REGISTRY, Backend, Engine
from service.core.errors import new_error_id
from service.core.fused import FusedTick
from service.core.stats import NetworkCall, StatsSink

log = logging.getLogger("service.core.runner")


@dataclass(frozen=True)
class TickPlan:
    """One tick, as the scheduler decided it. Row i of every per-row tuple is one image, in slot order."""

    slots: tuple[int, ...]  # the image's batch slot (row of the runner's state)
    seeds: tuple[int, ...]  # the image's seed (request seed + image index)
    steps: tuple[int, ...]  # the step index i: the ancestral step uses noise draw i + 1
    labels: tuple[int, ...]  # class label (or the null label) of the conditional row
    guidance: tuple[float, ...]  # classifier-free guidance scale
    guided: tuple[bool, ...]  # runs an unconditional row too (needs_uncond_row)
    t: tuple[float, ...]  # the step's time (float32 values)
    s: tuple[float, ...]  # the next time, where the ancestral step lands
    tau: tuple[float, ...]  # time of the features the light network uses (= t where due)
    due: tuple[bool, ...]  # the encoder refreshes this image's features at this step
    last: tuple[bool, ...]  # the image's final step: its picture is returned
    admitted: tuple[tuple[int, int], ...] = ()  # (slot, seed) of images joining now: z is set to noise draw 0 first
    preview: tuple[bool, ...] = ()  # return this image's current x0 estimate (a streamed preview); () = none
    resumed: tuple[tuple[int, np.ndarray], ...] = ()  # (slot, z) of paused images coming back: z is restored first
    paused: tuple[int, ...] = ()  # slots whose image pauses now: their z is read back before anything else
    snapshot: tuple[int, ...] = ()  # slots whose z is read back before the step (a job's checkpoint), and kept


@dataclass(eq=False)
class PreviewRows:
    """A tick's rows whose preview was asked for, as they stood before the step (copied to the CPU). Their pictures
    are made on first use by whoever shows them (the stream's event loop), not on the tick loop, where the ~20 small
    tensor ops of x0 = alpha_t z_t - sigma_t v and the uint8 conversion (~125 us) held up every preview tick."""

    z: Tensor
    v_cond: Tensor
    v_uncond: Tensor
    guidance: Tensor
    t: Tensor
    sched: CosineSchedule
    output_size: int | tuple[int, int]
    prediction: str = "v"
    _pictures: np.ndarray | None = None

    def picture(self, row: int) -> np.ndarray:
        """Row `row`'s current x0 estimate as a delivered picture (uint8, like `TickOutcome.finished`)."""
        if self._pictures is None:
            x0 = preview_x0(self.z, self.v_cond, self.v_uncond, self.guidance, self.t, self.sched, self.prediction)
            self._pictures = to_uint8(x0, self.output_size)
        return self._pictures[row]


@dataclass(frozen=True)
class Preview:
    """One image's preview: its row of a tick's `PreviewRows`."""

    rows: PreviewRows
    row: int

    def picture(self) -> np.ndarray:
        return self.rows.picture(self.row)


@dataclass
class TickOutcome:
    finished: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> delivered picture (uint8)
    failed: dict[int, str] = field(default_factory=dict)  # slot -> error id (logged with the traceback)
    previews: dict[int, Preview] = field(default_factory=dict)  # slot -> x0 estimate before this step, made on use
    paused: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> z of an image paused by this plan (host)
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> z before this step (plan.snapshot)
    encoder_rows: int = 0
    denoiser_rows: int = 0


class _Ready:
    """Features computed on the caller's thread, behind the same `result()` as an asynchronous handle."""

    def __init__(self, feats: tuple[Tensor, ...]) -> None:
        self.feats = feats

    def result(self) -> tuple[Tensor, ...]:
        return self.feats


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's switches (from the settings, resolved against the backend's capabilities)."""

    overlap_encoder: bool = True  # the light network runs the not-due rows while the encoder runs the due ones
    fused: bool = False  # each tick as one program (service.core.fused): backends with the fused_tick capability


class Runner:
    def __init__(self, engine: Engine, sched: CosineSchedule, null_label: int, max_active_images: int,
                 config: RunnerConfig | None = None, output_size: int | tuple[int, int] | None = None,
                 stats: StatsSink | None = None, prediction: str = "v") -> None:
        """`output_size`: the delivered crop, a side or (height, width) (None = the whole sample); `prediction`:
        what the denoiser predicts (v, eps or x0: the model card's)."""
        assert engine.max_batch >= 2 * max_active_images, "a guided image takes two rows"
        config = config or RunnerConfig()
        self.engine, self.sched, self.null_label, self.slots = engine, sched, null_label, max_active_images
        self.overlap_encoder = config.overlap_encoder
        self.sample_shape = engine.sample_shape
        self.output_size: int | tuple[int, int] = output_size or (self.sample_shape[1], self.sample_shape[2])
        self.prediction = prediction
        self.stats = stats or StatsSink()
        dev = self.device = engine.device
        # One spare "trash" slot past the last (z row max_active_images, cache row 2 max_active_images): the fused
        # tick's padded rows read and write there.
        self.z = torch.zeros(max_active_images + 1, *self.sample_shape, device=dev)
        # Feature cache, one tensor per encoder level, in the engine's feature dtype: row `slot` holds a slot's
        # conditional features, row `max_active_images + slot` its unconditional ones. A full batch in slot order
        # reads it as views.
        self.cache = [torch.zeros(2 * max_active_images + 1, *s, device=dev, dtype=engine.feature_dtype)
                      for s in engine.feature_shapes]
        self.fused: FusedTick | None = None
        if config.fused:
            if not REGISTRY[Backend(engine.info.backend)].fused_tick:
                raise ValueError(f"the fused tick needs a backend with the fused_tick capability (torch), not "
                                 f"{engine.info.backend}")
            encode, denoise = engine.network_calls()  # type: ignore[attr-defined]
            self.fused = FusedTick(encode, denoise, engine.buckets, self.z, self.cache, sched,  # type: ignore[attr-defined]
                                   null_label, graphs=dev.startswith("cuda"), prediction=prediction)

    def thread_started(self) -> None:
        """Called once on the thread that runs the ticks. Where the networks are not torch on the CPU, torch does
        only the tick's own small tensor ops (gathers, guidance, noise of a few thousand elements each): run them on
        one thread. From a thread other than the main one, torch's intra-op pool made each of them far slower on two
        cores (a 16-row gather 103 us against 12, cos over 8192 floats 103 us against 6; docs/cpu_backends.md). The
        torch backend on the CPU keeps its threads: its networks need them."""
        if not (self.engine.info.backend is Backend.TORCH and self.device == "cpu"):
            torch.set_num_threads(1)

    # ---- one tick ---------------------------------------------------------------------------------------------

    def sample(self, slot: int) -> np.ndarray:
        """A slot's current sample z, copied to host memory (a paused image's whole state with its step)."""
        return self.z[slot].cpu().numpy().copy()

    def run(self, plan: TickPlan) -> TickOutcome:
        out = TickOutcome(paused={slot: self.sample(slot) for slot in plan.paused},  # before the slots are reused
                          snapshots={slot: self.sample(slot) for slot in plan.snapshot})
        if plan.admitted:
            slots, seeds = zip(*plan.admitted, strict=True)
            self.z[list(slots)] = draw_noise(seeds, [0] * len(seeds), self.sample_shape, self.device)
        for slot, z in plan.resumed:  # a paused image's sample, or a checkpoint's (flat float32)
            self.z[slot] = torch.from_numpy(np.asarray(z).reshape(self.sample_shape)).to(self.device)
        if not plan.slots:
            return out
        everything = list(range(len(plan.slots)))
        if self.fused is not None:
            try:
                z_before, v_cond, v_uncond, enc_rows, den_rows = self.fused.run(plan, everything)
                if enc_rows:
                    self.stats.network_call(NetworkCall("encoder", enc_rows, None))
                self.stats.network_call(NetworkCall("denoiser", den_rows, None))
                out.previews.update(self._previews(plan, everything, z_before, v_cond, v_uncond))
                out.encoder_rows, out.denoiser_rows = enc_rows, den_rows
                self._finished(plan, everything, out)
                return out
            except Exception:
                # The samples are written last, so a failed program left them as they were; the unfused path below
                # recomputes the due rows' features and isolates the images that fail.
                log.exception("fused tick failed: running this tick unfused")
        ok, out.failed = self._isolate(plan, everything, retry=True)
        for idx, (v_cond, v_uncond, enc_rows, den_rows) in ok:
            out.previews.update(self._step(plan, idx, v_cond, v_uncond))
            out.encoder_rows += enc_rows
            out.denoiser_rows += den_rows
            self._finished(plan, idx, out)
        return out

    def _finished(self, plan: TickPlan, idx: list[int], out: TickOutcome) -> None:
        """The delivered pictures of the rows that took their last step (the only read-back of a plain tick)."""
        done = [i for i in idx if plan.last[i]]
        if done:
            pics = to_uint8(self.z[torch.tensor([plan.slots[i] for i in done], device=self.device)], self.output_size)
            out.finished.update({plan.slots[i]: p for i, p in zip(done, pics, strict=True)})

    def _isolate(self, plan: TickPlan, idx: list[int], retry: bool) -> tuple[list, dict[int, str]]:
        """Run the networks for rows `idx`; on failure retry once, then split in halves down to the rows that fail
        on their own. Rows do not depend on what else is in their call, so the halves compute what the whole would
        have. Running the networks changes nothing but the rows' own cache entries, so a retry is safe."""
        try:
            return [(idx, self._networks(plan, idx))], {}
        except Exception:
            error_id = new_error_id()
            log.exception("engine failure (error id %s) in a call for %d images%s", error_id, len(idx),
                          ": retrying once" if retry else "")
            if retry:
                return self._isolate(plan, idx, retry=False)
            if len(idx) == 1:
                return [], {plan.slots[idx[0]]: error_id}
        mid = len(idx) // 2
        ok_a, bad_a = self._isolate(plan, idx[:mid], retry=False)
        ok_b, bad_b = self._isolate(plan, idx[mid:], retry=False)
        return ok_a + ok_b, {**bad_a, **bad_b}

    def _step(self, plan: TickPlan, idx: list[int], v_cond: Tensor, v_uncond: Tensor) -> dict[int, Preview]:
        """The ancestral step for rows `idx`, each with its own noise (a function of its seed and step).
        -> slot -> preview, for the rows the plan asks a preview of (none asked: no extra work)."""
        dev = self.device
        slots = torch.tensor([plan.slots[i] for i in idx], device=dev)
        t, s, g = (torch.tensor([col[i] for i in idx], dtype=torch.float32, device=dev)
                   for col in (plan.t, plan.s, plan.guidance))
        z = self.z[slots]
        previews = self._previews(plan, idx, z, v_cond, v_uncond)
        noise = draw_noise([plan.seeds[i] for i in idx], [plan.steps[i] + 1 for i in idx], self.sample_shape, dev)
        self.z[slots] = guided_step(z, v_cond, v_uncond, g, t, s, self.sched, noise, self.prediction)
        return previews

    def _previews(self, plan: TickPlan, idx: list[int], z: Tensor, v_cond: Tensor, v_uncond: Tensor) -> dict[int, Preview]:
        """slot -> preview, for the rows `idx` the plan asks a preview of (none asked: no work, no read-back)."""
        want = [j for j, i in enumerate(idx) if plan.preview and plan.preview[i]]
        if not want:
            return {}
        # Two copies to the CPU (two waits for the device), not five.
        zv = torch.cat([z[want], v_cond[want], v_uncond[want]]).float().cpu().chunk(3)
        g, t = (torch.tensor([col[idx[j]] for j in want], dtype=torch.float32) for col in (plan.guidance, plan.t))
        rows = PreviewRows(zv[0], zv[1], zv[2], g, t, self.sched, self.output_size, self.prediction)
        return {plan.slots[idx[j]]: Preview(rows, r) for r, j in enumerate(want)}

    # ---- the networks -----------------------------------------------------------------------------------------

    def _networks(self, plan: TickPlan, idx: list[int]) -> tuple[Tensor, Tensor, int, int]:
        """-> v_cond, v_uncond (len(idx), C, S, S) (v_uncond = v_cond for unguided images), encoder rows, light rows."""
        b = len(idx)
        guided = [j for j, i in enumerate(idx) if plan.guided[i]]
        uncond_pos = {j: k for k, j in enumerate(guided)}  # position in idx -> its unconditional row, after the b
        due = [j for j, i in enumerate(idx) if plan.due[i]]
        rest = [j for j, i in enumerate(idx) if not plan.due[i]]
        enc_rows, den_rows = len(due) + sum(plan.guided[idx[j]] for j in due), b + len(guided)
        v_all = torch.empty(b + len(guided), *self.sample_shape, device=self.device)  # cond rows, then uncond rows
        handle = None
        if due:
            pos_d, (zd, td, _, yd, rows_d) = self._rows(plan, idx, due, uncond_pos)
            t_enc = time.perf_counter()
            # Its own stream / worker thread when the light network has other rows to run meanwhile; with nothing to
            # overlap (every row due, as aligned admission makes most refresh ticks) a hand-off would only cost.
            handle = self.engine.encode_async(zd, td, yd) if rest else _Ready(self.engine.encode(zd, td, yd))
        if handle is not None and rest and not self.overlap_encoder:
            # No overlap: wait for the features, then one light-network call over every row (one bigger batch).
            self._store(rows_d, handle.result(), t_enc)
            handle = None
            due, rest = [], due + rest
        if rest:
            pos_r, (zr, tr, taur, yr, rows_r) = self._rows(plan, idx, rest, uncond_pos)
            v_all[pos_r] = self._light((zr, tr, taur, yr), self._cached(rows_r))
        if handle is not None:
            feats = self._store(rows_d, handle.result(), t_enc)
            v_all[pos_d] = self._light((zd, td, td, yd), feats)  # fresh features: tau = t
        v_cond = v_all[:b]
        v_uncond = v_cond.clone()
        if guided:
            v_uncond[guided] = v_all[b:]
        return v_cond, v_uncond, enc_rows, den_rows

    def _rows(self, plan: TickPlan, idx: list[int], sel: list[int], uncond_pos: dict[int, int]) -> tuple[list[int], tuple]:
        """Network rows for positions `sel` of `idx`: their conditional rows, then the unconditional rows of the
        guided ones. -> (positions of these rows in the call's row order, (z, t, tau, label, feature cache rows))."""
        unc = [j for j in sel if plan.guided[idx[j]]]
        src = [idx[j] for j in sel + unc]
        dev = self.device
        slots = torch.tensor([plan.slots[i] for i in src])
        is_unc = torch.tensor([False] * len(sel) + [True] * len(unc))
        t = torch.tensor([plan.t[i] for i in src], dtype=torch.float32, device=dev)
        tau = torch.tensor([plan.tau[i] for i in src], dtype=torch.float32, device=dev)
        label = torch.tensor([plan.labels[idx[j]] for j in sel] + [self.null_label] * len(unc), dtype=torch.long,
                             device=dev)
        cache_rows = slots + self.slots * is_unc.long()
        return sel + [len(idx) + uncond_pos[j] for j in unc], (self.z[slots.to(dev)], t, tau, label, cache_rows)

    def _light(self, inputs: tuple[Tensor, Tensor, Tensor, Tensor], feats: tuple[Tensor, ...]) -> Tensor:
        """One light-network call; inputs: z, t, tau, label."""
        z, t, tau, label = inputs
        t1 = time.perf_counter()
        v = self.engine.denoise(z, t, tau, label, feats).float()
        self.stats.network_call(NetworkCall("denoiser", v.shape[0], time.perf_counter() - t1))
        return v

    def _cache_index(self, rows: Tensor) -> slice | Tensor:
        """Index of `rows` in the feature cache: a slice when they are consecutive (a full batch in slot order: reads
        are views and writes one copy, where a gather cost ~4% of a CPU tick at 16 slots), else an index tensor."""
        n = len(rows)
        if n and bool((rows == torch.arange(int(rows[0]), int(rows[0]) + n)).all()):
            return slice(int(rows[0]), int(rows[0]) + n)
        return rows.to(self.device)

    def _cached(self, rows: Tensor) -> tuple[Tensor, ...]:
        ix = self._cache_index(rows)
        return tuple(c[ix] for c in self.cache)

    def _store(self, rows: Tensor, feats: tuple[Tensor, ...], t_enc: float) -> tuple[Tensor, ...]:
        self.stats.network_call(NetworkCall("encoder", len(rows), time.perf_counter() - t_enc))
        ix = self._cache_index(rows)
        for c, f in zip(self.cache, feats, strict=True):
            c[ix] = f.to(c.dtype)
        return feats
