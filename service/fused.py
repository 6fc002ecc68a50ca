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

import numpy as np
import torch
from torch import Tensor

from dualrate.diffusion import CosineSchedule
from dualrate.sampler import draw_noise, guided_step
from engines.compiled import Buckets

log = logging.getLogger("service.fused")

NetCall = Callable[..., object]


@dataclass(frozen=True)
class Key:
    images: int  # image bucket
    rows: int  # light-network row bucket
    enc: int  # encoder row bucket (0: no refresh this tick)


class _Program:
    """Static input buffers of one key, the function over them, and (CUDA) its captured graph."""

    def __init__(self, key: Key, device: str) -> None:
        self.key = key
        b, r, e = key.images, key.rows, key.enc
        self.n_int = 5 * b + 3 * r + 3 * e  # slot seed step cond_row uncond_row | zslot cache_row label (rows, enc)
        self.n_float = 3 * b + 2 * r + e  # t s g | t tau | tau
        self.ints = torch.zeros(self.n_int, dtype=torch.int64, device=device)
        self.floats = torch.zeros(self.n_float, dtype=torch.float32, device=device)
        pin = device.startswith("cuda")
        self.host_ints = torch.zeros(self.n_int, dtype=torch.int64, pin_memory=pin)
        self.host_floats = torch.zeros(self.n_float, dtype=torch.float32, pin_memory=pin)
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
                 sched: CosineSchedule, null_label: int, graphs: bool) -> None:
        self.encode, self.denoise, self.buckets = encode, denoise, buckets
        self.z, self.cache, self.sched, self.null_label = z, cache, sched, null_label
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
        b, r, e = p.key.images, p.key.rows, p.key.enc
        ints, floats = p.ints, p.floats
        slot, seed, step, cond_row, uncond_row = ints[: 5 * b].view(5, b)
        r_zslot, r_cache, r_label = ints[5 * b : 5 * b + 3 * r].view(3, r)
        t, s, g = floats[: 3 * b].view(3, b)
        r_t, r_tau = floats[3 * b : 3 * b + 2 * r].view(2, r)
        if e:
            e_zslot, e_cache, e_label = ints[5 * b + 3 * r :].view(3, e)
            e_tau = floats[3 * b + 2 * r :]
            feats = self.encode(self.z[e_zslot], e_tau, e_label)
            for c, f in zip(self.cache, feats, strict=True):  # type: ignore[call-overload]
                c.index_copy_(0, e_cache, f.to(c.dtype))
        v = self.denoise(self.z[r_zslot], r_t, r_tau, r_label, *(c[r_cache] for c in self.cache))
        assert isinstance(v, Tensor)
        z_before, v_cond, v_uncond = self.z[slot], v[cond_row], v[uncond_row]
        noise = draw_noise(seed, step + 1, self.sample_shape, self.device)  # type: ignore[arg-type]
        self.z.index_copy_(0, slot, guided_step(z_before, v_cond, v_uncond, g, t, s, self.sched, noise))
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

    def _fill_padding(self, p: _Program) -> None:
        """Every row of the static buffers at its padding value (the trash slot, valid times)."""
        b, r, e = p.key.images, p.key.rows, p.key.enc
        hi, hf = p.host_ints, p.host_floats
        hi.zero_()
        hi[0:b] = self.trash
        hi[5 * b : 5 * b + r] = self.trash
        hi[5 * b + r : 5 * b + 2 * r] = self.cache_trash
        hi[5 * b + 2 * r : 5 * b + 3 * r] = self.null_label
        if e:
            o = 5 * b + 3 * r
            hi[o : o + e] = self.trash
            hi[o + e : o + 2 * e] = self.cache_trash
            hi[o + 2 * e :] = self.null_label
        hf.fill_(0.5)
        hf[b : 2 * b] = 0.25  # s < t for padded images
        hf[2 * b : 3 * b] = 1.0
        p.ints.copy_(hi)
        p.floats.copy_(hf)

    # ---- one tick ----------------------------------------------------------------------------------------------

    def run(self, plan, idx: list[int]) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """The tick for rows `idx` of `plan` (a service.runner.TickPlan). -> (z before the step, v_cond, v_uncond)
        for those rows (views of the program's outputs, valid until the next tick), encoder rows, light rows."""
        n = len(idx)
        guided = [j for j, i in enumerate(idx) if plan.guided[i]]
        due = [j for j, i in enumerate(idx) if plan.due[i]]
        due_unc = [j for j in due if plan.guided[idx[j]]]
        n_rows, n_enc = n + len(guided), len(due) + len(due_unc)
        key = Key(self.buckets.bucket(n), self.buckets.bucket(n_rows), self.buckets.bucket(n_enc) if n_enc else 0)
        p = self._program(key)
        b, r, e = key.images, key.rows, key.enc
        if p.copied is not None:
            p.copied.synchronize()  # the previous tick's copy out of these host buffers has run
        hi, hf = p.host_ints.numpy(), p.host_floats.numpy()
        slots = np.array([plan.slots[i] for i in idx], dtype=np.int64)
        col = lambda c: [c[i] for i in idx]  # noqa: E731
        unc_row = np.arange(n, dtype=np.int64)
        unc_row[guided] = n + np.arange(len(guided))
        # images
        hi[0:n] = slots
        hi[b : b + n] = col(plan.seeds)
        hi[2 * b : 2 * b + n] = col(plan.steps)
        hi[3 * b : 3 * b + n] = np.arange(n)
        hi[4 * b : 4 * b + n] = unc_row
        hi[n:b] = self.trash
        hi[3 * b + n : 3 * b + b] = 0
        hi[4 * b + n : 4 * b + b] = 0
        hf[0:n], hf[b : b + n], hf[2 * b : 2 * b + n] = col(plan.t), col(plan.s), col(plan.guidance)
        # light-network rows: conditional rows of every image, then the unconditional rows of the guided ones
        o = 5 * b
        g_slots = slots[guided]
        labels = np.array(col(plan.labels), dtype=np.int64)
        hi[o : o + n_rows] = np.concatenate([slots, g_slots])
        hi[o + r : o + r + n_rows] = np.concatenate([slots, g_slots + self.stride])
        hi[o + 2 * r : o + 2 * r + n_rows] = np.concatenate([labels, np.full(len(guided), self.null_label)])
        hi[o + n_rows : o + r] = self.trash
        hi[o + r + n_rows : o + 2 * r] = self.cache_trash
        hi[o + 2 * r + n_rows : o + 3 * r] = self.null_label
        ts, taus = np.array(col(plan.t), dtype=np.float32), np.array(col(plan.tau), dtype=np.float32)
        fo = 3 * b
        hf[fo : fo + n_rows] = np.concatenate([ts, ts[guided]])
        hf[fo + r : fo + r + n_rows] = np.concatenate([taus, taus[guided]])
        hf[fo + n_rows : fo + r] = 0.5
        hf[fo + r + n_rows : fo + 2 * r] = 0.5
        if e:
            o = 5 * b + 3 * r
            d_slots, du_slots = slots[due], slots[due_unc]
            hi[o : o + n_enc] = np.concatenate([d_slots, du_slots])
            hi[o + e : o + e + n_enc] = np.concatenate([d_slots, du_slots + self.stride])
            hi[o + 2 * e : o + 2 * e + n_enc] = np.concatenate([labels[due], np.full(len(due_unc), self.null_label)])
            hi[o + n_enc : o + e] = self.trash
            hi[o + e + n_enc : o + 2 * e] = self.cache_trash
            hi[o + 2 * e + n_enc :] = self.null_label
            fo = 3 * b + 2 * r
            hf[fo : fo + n_enc] = np.concatenate([taus[due], taus[due_unc]])
            hf[fo + n_enc :] = 0.5
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
