"""The one configuration object of a run, and the architectures it can name.

The config is saved as JSON inside every checkpoint, so that `sample.py --ckpt`
rebuilds the exact generator from the checkpoint directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from digitscape_jax.errors import UserError

NoiseKind = Literal["uniform", "normal"]
# Compute dtypes of the forward and backward passes; params, optimizer state,
# BatchNorm statistics and losses are float32 under either.
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Widths and defaults of one DCGAN variant.

    The generator maps noise to a 7x7 map with `g_dense_channels` channels, then
    runs transposed convolutions with `g_conv_channels` (strides 1, 2) and a
    final stride-2 one to a single channel. The discriminator has one stride-2
    convolution per entry of `d_channels`.
    """

    g_dense_channels: int
    g_conv_channels: tuple[int, int]
    d_channels: tuple[int, int]
    noise: NoiseKind
    batch_size: int
    learning_rate: float  # Adam's, for G and D
    beta1: float


ARCHS: dict[str, ArchSpec] = {
    # The original Keras "Digitscape" model.
    "seed": ArchSpec(8, (8, 16), (16, 32), noise="uniform", batch_size=64, learning_rate=1e-4,
                     beta1=0.9),
    # The same network at the widths of the TensorFlow DCGAN tutorial, with the DCGAN
    # paper's Adam: it learned far faster than 1e-4 / 0.9 here (README, Quality).
    "dcgan": ArchSpec(256, (128, 64), (64, 128), noise="normal", batch_size=256,
                      learning_rate=2e-4, beta1=0.5),
}

DEFAULT_ARCH = "dcgan"

MAX_SEED = 2**32  # A JAX key (without 64-bit mode) holds 32 bits of seed: more would collide.

# Fields that define the networks' shapes: a checkpoint can only be resumed or
# sampled with the values it was written with.
MODEL_FIELDS = ("arch", "latent_dim", "conditional")
# Fields that only say how long to train, how often to report and where the batches are
# gathered: free to change on resume.
RUN_LENGTH_FIELDS = ("steps", "log_every", "sample_every", "ckpt_every", "eval_every",
                     "eval_samples", "data_on_device")
MIN_EVAL_SAMPLES = 100  # Fewer digits give FDs dominated by their small-sample bias.


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    `batch_size`, `learning_rate` and `beta1` left as None take the arch's values
    (`ArchSpec`), so `Config(arch="seed")` is the original's run; after construction
    they always hold numbers.
    """

    arch: str = DEFAULT_ARCH
    latent_dim: int = 100
    conditional: bool = False
    batch_size: int | None = None
    learning_rate: float | None = None
    beta1: float | None = None
    beta2: float = 0.999
    seed: int = 0
    dtype: str = "float32"
    ema_decay: float = 0.999
    steps_per_call: int = 1
    data_on_device: bool = False
    steps: int = 20_000
    log_every: int = 100
    sample_every: int = 1_000
    ckpt_every: int = 1_000
    eval_every: int = 2_000
    eval_samples: int = 2_000

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        for name in ("batch_size", "learning_rate", "beta1"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self.spec, name))
        for name in ("latent_dim", "batch_size", "steps", "log_every", "sample_every", "ckpt_every",
                     "steps_per_call"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.learning_rate < float("inf"):
            raise UserError(f"learning_rate must be positive and finite, got {self.learning_rate}")
        if self.eval_every < 0:
            raise UserError(f"eval_every must be >= 0 (0: no evaluation), got {self.eval_every}")
        if self.eval_samples < MIN_EVAL_SAMPLES:
            raise UserError(f"eval_samples must be at least {MIN_EVAL_SAMPLES}, got {self.eval_samples}")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of {list(COMPUTE_DTYPES)}")
        if not 0 <= self.seed < MAX_SEED:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Config:
        """Builds a Config from parsed JSON, refusing unknown or mistyped fields."""
        if not isinstance(data, dict):
            raise UserError(f"config must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UserError(f"config has unknown field(s): {', '.join(unknown)}")
        values, defaults = {}, cls()
        for name, value in data.items():
            expected = type(getattr(defaults, name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not expected:
                raise UserError(
                    f"config field {name!r} must be {expected.__name__}, got {json.dumps(value)}"
                )
            values[name] = value
        return cls(**values)

    def changed_from(self, saved: Config) -> list[str]:
        """The settings, other than the length of the run, that differ from `saved`."""
        return [f"{f.name} {getattr(saved, f.name)} -> {getattr(self, f.name)}"
                for f in dataclasses.fields(self)
                if f.name not in RUN_LENGTH_FIELDS and getattr(self, f.name) != getattr(saved, f.name)]

    def check_resumable_with(self, saved: Config) -> None:
        """Refuses to continue a checkpoint whose networks have other shapes."""
        for name in MODEL_FIELDS:
            ours, theirs = getattr(self, name), getattr(saved, name)
            if ours != theirs:
                raise UserError(
                    f"checkpoint was trained with {name}={theirs!r} but this run asks for "
                    f"{name}={ours!r}; use another --ckpt-dir or the same {name}"
                )
