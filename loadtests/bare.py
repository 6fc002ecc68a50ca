"""What the saturation benchmarks share: the bare engine loop's images/s, and the split of a run's wall time by the
service's own metrics."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from engines import create_engine


def saturation_body(checkpoint: Path) -> dict:
    """A single-image request at the model card's defaults (the saturation benchmarks' request)."""
    d = load_checkpoint(checkpoint).defaults
    return {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}


def settings_arm(arm: str) -> dict[str, str]:
    """KEY=VALUE[,KEY=VALUE] (DUALRATE_* without the prefix), or "default" -> the settings of one arm."""
    return dict(kv.split("=", 1) for kv in arm.split(",") if kv != "default")


def bare_engine_ips(checkpoint: Path, batch: int, steps: int, k: int, g: float, seconds: float) -> float:
    model = load_checkpoint(checkpoint)
    engine = create_engine(checkpoint, backend="onnxruntime", device="cpu", max_batch=2 * batch)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(batch) % model.cfg.num_classes

    def run() -> None:
        dual_rate_sample(engine.encode, engine.denoise, labels, list(range(batch)), steps, k, g, sched,
                         model.cfg.null_label, sample_shape=model.cfg.sample_shape)

    run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        n += batch
    engine.close()
    return n / (time.perf_counter() - t0)


def tick_breakdown(url: str, run) -> tuple[Any, dict[str, float]]:
    """Run `run()` and split its wall time with the service's own metrics: the share spent inside scheduler ticks,
    inside light-network and encoder calls (the encoder's, for async calls, from submit to features ready), ticks/s
    and images per tick. -> (run's result, figures)."""
    from loadtests.process import metric

    names = [("tick_s", "dualrate_tick_duration_seconds_sum", ""), ("ticks", "dualrate_tick_duration_seconds_count", ""),
             ("den_s", "dualrate_network_duration_seconds_sum", 'network="denoiser"'),
             ("enc_s", "dualrate_network_duration_seconds_sum", 'network="encoder"'),
             ("den_rows", "dualrate_network_rows_total", 'network="denoiser"')]

    def read() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {k: metric(text, n, lab) for k, n, lab in names}

    before, t0 = read(), time.perf_counter()
    out = run()
    wall, after = time.perf_counter() - t0, read()
    d = {k: after[k] - before[k] for k in before}
    ticks = max(d["ticks"], 1.0)
    return out, {"ticks_per_s": d["ticks"] / wall, "in_ticks": d["tick_s"] / wall, "in_light_network": d["den_s"] / wall,
                 "in_encoder": d["enc_s"] / wall, "rows_per_tick": d["den_rows"] / ticks,
                 "ms_per_tick_outside_light_network": 1000 * (d["tick_s"] - d["den_s"]) / ticks}


def saturation_args(p: argparse.ArgumentParser) -> None:
    """The options the saturation benchmarks share (service_bench, saturation, interleaved, windows)."""
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    p.add_argument("--slots", type=int, default=16, help="max_active_images of the service")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file")


def log_progress() -> None:
    """Progress lines on stderr, without httpx's line per request."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
