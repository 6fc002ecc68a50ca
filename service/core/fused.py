"""One tick as one fixed-shape program: on CUDA one captured graph replay per (image, row, encoder-row) bucket.

The runner's plan becomes a few small host arrays (slot indices, seeds, steps, times, labels, guidance, the rows of
each image), padded to the buckets with rows that point at a spare "trash" slot, and written into static buffers in
two host-to-device copies. The program then does the whole tick on the device-resident state, with no host work:

1. the encoder on the rows due for a refresh (when any), its features written into the feature cache;
2. the light network on every row (conditional rows, then the unconditional rows of guided images), features
   gathered from the cache;
3. classifier-free guidance and the ancestral step with the counter-based noise (`dualrate.sampler.guided_step`,
   `draw_noise`: the same functions as the reference sampler), scattered back into the samples.

On CUDA each key is captured once (`torch.cuda.graph`, one memory pool for all of them) and replayed; elsewhere the
same function runs as it is (with compiled networks where the engine has them). The encoder runs on the tick's
stream here, before the light network: the encoder-stream overlap of the unfused runner hid nothing measurable at
these sizes on an H100 (docs/gpu.md), and inside one graph the launch gaps it could fill are gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualrate.diffusion import CosineSchedule
from dualrate.sampler import draw_noise, guided_step
from engines.compiled import Buckets

log = logging.getLogger("service.core.fused")

NetCall = Callable[..., object]


@dataclass(frozen=True)
class Key:
    images: int  # image bucket
    rows: int  # light-network row bucket
    enc: int  # encoder row bucket (0: no refresh this tick)


# The static buffers' fields, per image, per light-network row and per encoder row, in buffer order.
INT_FIELDS = (("slot", "seed", "step", "cond_row", "uncond_row"), ("r_zslot", "r_cache", "r_label"),
              ("e_zslot", "e_cache", "e_label"))
FLOAT_FIELDS = (("t", "s", "g"), ("r_t", "r_tau"), ("e_tau",))


def _layout(key: Key, groups: tuple[tuple[str, ...], ...]) -> tuple[dict[str, slice], int]:
    """Each field's place in one flat buffer (a group's fields have its bucket's length). -> (places, length)."""
    places, at = {}, 0
    for names, size in zip(groups, (key.images, key.rows, key.enc), strict=True):
        for name in names:
            places[name] = slice(at, at + size)
            at += size
    return places, at


class _Program:
    """Static input buffers of one key, the function over them, and (CUDA) its captured graph."""

    def __init__(self, key: Key, device: str) -> None:
        self.key = key
        self.int_at, n_int = _layout(key, INT_FIELDS)
        self.float_at, n_float = _layout(key, FLOAT_FIELDS)
        self.ints = torch.zeros(n_int, dtype=torch.int64, device=device)
        self.floats = torch.zeros(n_float, dtype=torch.float32, device=device)
        pin = device.startswith("cuda")
        self.host_ints = torch.zeros(n_int, dtype=torch.int64, pin_memory=pin)
        self.host_floats = torch.zeros(n_float, dtype=torch.float32, pin_memory=pin)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[Tensor, Tensor, Tensor] | None = None
        # CUDA: the host buffers are pinned and copied asynchronously; the next tick waits for this event before it
        # writes them again (the host runs at most one tick ahead of the copies).
        self.copied = torch.cuda.Event() if pin else None


class FusedTick:
    """Runs a runner's tick as one program per key. `z` (slots + 1 rows: the last is the trash slot) and `cache`
    (2 slots + 1 rows per level: conditional rows, unconditional rows, the trash row) are the runner's tensors,
    updated in place."""

    def __init__(self, encode: NetCall, denoise: NetCall, buckets: Buckets, z: Tensor, cache: list[Tensor],
                 sched: CosineSchedule, null_label: int, graphs: bool, prediction: str = "v") -> None:
        self.encode, self.denoise, self.buckets = encode, denoise, buckets
        self.z, self.cache, self.sched, self.null_label = z, cache, sched, null_label
        self.prediction = prediction  # what the denoiser predicts: v, eps or x0
        self.trash = z.shape[0] - 1  # the trash slot (= the number of real slots)
        self.stride = self.trash  # cache row of a slot's unconditional features: slot + stride
        self.cache_trash = 2 * self.trash
        self.device = str(z.device)
        self.graphs = graphs and self.device.startswith("cuda")
        self.sample_shape = tuple(z.shape[1:])
        self.programs: dict[Key, _Program] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.captures = 0

    # ---- the program -------------------------------------------------------------------------------------------

    def _body(self, p: _Program) -> tuple[Tensor, Tensor, Tensor]:
        i = {name: p.ints[at] for name, at in p.int_at.items()}
        f = {name: p.floats[at] for name, at in p.float_at.items()}
        if p.key.enc:
            feats = self.encode(self.z[i["e_zslot"]], f["e_tau"], i["e_label"])
            for c, x in zip(self.cache, feats, strict=True):  # type: ignore[call-overload]
                c.index_copy_(0, i["e_cache"], x.to(c.dtype))
        v = self.denoise(self.z[i["r_zslot"]], f["r_t"], f["r_tau"], i["r_label"], *(c[i["r_cache"]] for c in self.cache))
        assert isinstance(v, Tensor)
        z_before, v_cond, v_uncond = self.z[i["slot"]], v[i["cond_row"]], v[i["uncond_row"]]
        noise = draw_noise(i["seed"], i["step"] + 1, self.sample_shape, self.device)  # type: ignore[arg-type]
        z_after = guided_step(z_before, v_cond, v_uncond, f["g"], f["t"], f["s"], self.sched, noise, self.prediction)
        self.z.index_copy_(0, i["slot"], z_after)
        return z_before, v_cond, v_uncond

    def _program(self, key: Key) -> _Program:
        p = self.programs.get(key)
        if p is not None:
            return p
        p = _Program(key, self.device)
        self._fill_padding(p)
        if self.graphs:
            t0 = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                self._body(p)  # warm-up outside the graph (touches only the trash rows)
            torch.cuda.current_stream().wait_stream(side)
            p.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(p.graph, pool=self._pool), torch.inference_mode():
                p.out = self._body(p)
            self.captures += 1
            log.info("captured the tick graph for %s in %.2f s", key, time.perf_counter() - t0)
        self.programs[key] = p
        return p

    def _write(self, p: _Program, rows: dict[str, Any]) -> None:
        """Write the tick's rows into the host buffers, each field's tail at its padding value (the trash slot, the
        trash cache row, the null label, valid times: s < t). `rows` empty: padding alone."""
        pads = {"slot": self.trash, "r_zslot": self.trash, "e_zslot": self.trash, "r_cache": self.cache_trash,
                "e_cache": self.cache_trash, "r_label": self.null_label, "e_label": self.null_label, "s": 0.25,
                "g": 1.0, "seed": 0, "step": 0, "cond_row": 0, "uncond_row": 0}
        for buf, places in ((p.host_ints.numpy(), p.int_at), (p.host_floats.numpy(), p.float_at)):
            for name, at in places.items():
                field, values = buf[at], rows.get(name, ())
                n = len(values)
                field[:n] = values
                field[n:] = pads.get(name, 0.5)

    def _fill_padding(self, p: _Program) -> None:
        """Every row of the static buffers at its padding value (before the first warm-up and capture)."""
        self._write(p, {})
        p.ints.copy_(p.host_ints)
        p.floats.copy_(p.host_floats)

    # ---- one tick ----------------------------------------------------------------------------------------------

    def run(self, plan, idx: list[int]) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """The tick for rows `idx` of `plan` (a service.core.runner.TickPlan). -> (z before the step, v_cond, v_uncond)
        for those rows (views of the program's outputs, valid until the next tick), encoder rows, light rows."""
        n = len(idx)
        guided = [j for j, i in enumerate(idx) if plan.guided[i]]
        due = [j for j, i in enumerate(idx) if plan.due[i]]
        due_unc = [j for j in due if plan.guided[idx[j]]]
        n_rows, n_enc = n + len(guided), len(due) + len(due_unc)
        key = Key(self.buckets.bucket(n), self.buckets.bucket(n_rows), self.buckets.bucket(n_enc) if n_enc else 0)
        p = self._program(key)
        if p.copied is not None:
            p.copied.synchronize()  # the previous tick's copy out of these host buffers has run
        slots = np.array([plan.slots[i] for i in idx], dtype=np.int64)
        labels = np.array([plan.labels[i] for i in idx], dtype=np.int64)
        ts, taus = (np.array([c[i] for i in idx], dtype=np.float32) for c in (plan.t, plan.tau))
        unc_row = np.arange(n, dtype=np.int64)
        unc_row[guided] = n + np.arange(len(guided))
        nulls = np.full(len(guided), self.null_label, dtype=np.int64)
        rows = {  # images; then light-network rows: every image's conditional row, the guided ones' unconditional
            "slot": slots, "seed": [plan.seeds[i] for i in idx], "step": [plan.steps[i] for i in idx],
            "cond_row": np.arange(n), "uncond_row": unc_row, "t": ts, "s": [plan.s[i] for i in idx],
            "g": [plan.guidance[i] for i in idx],
            "r_zslot": np.concatenate([slots, slots[guided]]),
            "r_cache": np.concatenate([slots, slots[guided] + self.stride]),
            "r_label": np.concatenate([labels, nulls]), "r_t": np.concatenate([ts, ts[guided]]),
            "r_tau": np.concatenate([taus, taus[guided]])}
        if n_enc:  # encoder rows: the due images' conditional rows, then their unconditional ones
            rows.update({
                "e_zslot": np.concatenate([slots[due], slots[due_unc]]),
                "e_cache": np.concatenate([slots[due], slots[due_unc] + self.stride]),
                "e_label": np.concatenate([labels[due], np.full(len(due_unc), self.null_label, dtype=np.int64)]),
                "e_tau": np.concatenate([taus[due], taus[due_unc]])})
        self._write(p, rows)
        p.ints.copy_(p.host_ints, non_blocking=True)
        p.floats.copy_(p.host_floats, non_blocking=True)
        if p.copied is not None:
            p.copied.record()
        if p.graph is not None:
            p.graph.replay()
            assert p.out is not None
            out = p.out
        else:
            with torch.inference_mode():
                out = self._body(p)
        z_before, v_cond, v_uncond = (x[:n] for x in out)
        return z_before, v_cond, v_uncond, n_enc, n_rows
