"""The one configuration object of a run, and the architectures it can name.

Each field of `Config` declares its help, bounds and choices once (`setting`):
train.py builds its flags from them, and `Config` checks the bounds, so adding a
hyperparameter is one edit here plus where it is used. The config is saved as
JSON inside every checkpoint, so that `sample.py --ckpt` rebuilds the exact
generator from the checkpoint directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

from digitscape_jax.errors import UserError

NoiseKind = Literal["uniform", "normal"]
LOSSES = ("bce", "hinge")
# What self-conditioning's k-means compares (clusters.cluster_points).
CLUSTER_FEATURES = ("pixels", "normalised")
# Which of D's layers spectral normalisation divides by their largest singular value.
SPECTRAL_NORMS = ("none", "convs")
# Compute dtypes of the forward and backward passes; params, optimizer state,
# BatchNorm statistics and losses are float32 under either.
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Widths and training recipe of one DCGAN variant.

    The generator maps noise to a 7x7 map with `g_dense_channels` channels, then runs
    transposed convolutions with `g_conv_channels` (strides 1, 2; the first with a
    `g_first_kernel` square kernel, the others 5x5) and a final stride-2 one to a single
    channel. The discriminator has one stride-2 convolution per entry of `d_channels`. The
    fields from `batch_size` on are the defaults of the Config fields of the same names.
    """

    g_dense_channels: int
    g_conv_channels: tuple[int, int]
    d_channels: tuple[int, int]
    noise: NoiseKind
    batch_size: int
    learning_rate: float  # Adam's, for G; D's is d_lr_scale times this
    beta1: float
    beta2: float = 0.999
    d_lr_scale: float = 1.0
    loss: str = "bce"
    r1_gamma: float = 0.0
    r1_every: int = 4
    d_dropout: float = 0.3
    translate: int = 0
    mode_seeking: float = 0.0
    conditional_mode_seeking: float | None = None  # mode_seeking with --conditional, if other
    clusters: int = 0
    cluster_features: str = "pixels"
    lr_half_life: int = 0
    minibatch_std: int = 0
    spectral_norm: str = "none"
    g_first_kernel: int = 5


ARCHS: dict[str, ArchSpec] = {
    # The original Keras "Digitscape" model.
    "seed": ArchSpec(8, (8, 16), (16, 32), noise="uniform", batch_size=64, learning_rate=1e-4,
                     beta1=0.9),
    # The same network at the widths of the TensorFlow DCGAN tutorial, with the DCGAN
    # paper's Adam: it learned far faster than 1e-4 / 0.9 here (docs/quality.md).
    "dcgan": ArchSpec(256, (128, 64), (64, 128), noise="normal", batch_size=256,
                      learning_rate=2e-4, beta1=0.5),
    # dcgan at half its widths and a quarter of its batch, with the same recipe: about 8x
    # fewer FLOPs per digit, and better digits per CPU-minute (docs/quality.md).
    "small": ArchSpec(128, (64, 32), (32, 64), noise="normal", batch_size=64,
                      learning_rate=2e-4, beta1=0.5),
    # small, self-conditioned on 300 clusters of the digits' shapes, without dropout in D,
    # at a higher learning rate that halves every 6,000 steps, with the mode-seeking term
    # (at half the weight with labels, which measured worse at 0.2 and 0.3), D's kernels
    # spectrally normalised, and a 3x3 kernel on G's 7x7 map (as good digits with two thirds
    # of the FLOPs): the levers that measured best per CPU-minute (docs/quality.md).
    "fast": ArchSpec(128, (64, 32), (32, 64), noise="normal", batch_size=64,
                     learning_rate=5e-4, beta1=0.5, d_dropout=0.0, clusters=300,
                     cluster_features="normalised", lr_half_life=6000, mode_seeking=0.2,
                     conditional_mode_seeking=0.1, spectral_norm="convs", g_first_kernel=3),
}

DEFAULT_ARCH = "fast"

NUM_CLASSES = 10
MAX_SEED = 2**32
MIN_EVAL_SAMPLES = 100  # Fewer digits give FDs dominated by their small-sample bias.


@dataclasses.dataclass(frozen=True)
class Bound:
    """A range of allowed values: `holds(value)`, said as `says` ("positive", ...).

    `noun` names a valid value for parse errors ("a positive integer"), where an
    adjective alone would not read well.
    """

    holds: Callable[[Any], bool]
    says: str
    noun: str | None = None

    def error(self, value: Any) -> str | None:
        """The reason `value` is out of bounds, or None where it is within them."""
        return None if self.holds(value) else f"must be {self.says}, got {value}"


POSITIVE = Bound(lambda v: v > 0, "positive", "a positive integer")
NON_NEGATIVE = Bound(lambda v: v >= 0, ">= 0", "an integer >= 0")
NON_NEGATIVE_FINITE = Bound(lambda v: 0.0 <= v < math.inf, ">= 0 and finite", "a number >= 0")
POSITIVE_FINITE = Bound(lambda v: 0.0 < v < math.inf, "positive and finite", "a positive number")
UNIT_INTERVAL = Bound(lambda v: 0.0 <= v < 1.0, "in [0, 1)", "a number in [0, 1)")
# A count that 0 turns off and 1 would make meaningless (one cluster, a group of one).
OFF_OR_AT_LEAST_2 = Bound(lambda v: v == 0 or v >= 2, "0 or at least 2", "0 or an integer >= 2")
POSITIVE_ODD = Bound(lambda v: v > 0 and v % 2 == 1, "positive and odd",
                     "a positive odd integer")
# A JAX key (without 64-bit mode) holds 32 bits of seed: more would collide.
SEED = Bound(lambda v: 0 <= v < MAX_SEED, "in [0, 2**32)", "an integer >= 0")


def at_least(minimum: int) -> Bound:
    return Bound(lambda v: v >= minimum, f">= {minimum}")


# What a field is to a checkpoint: "model" fields fix the networks' shapes or what their
# classes mean (a checkpoint is only resumed or sampled with the values it was written
# with); "schedule" fields only say how long to train, how often to report and where batches
# are gathered (free to change on resume); "recipe" fields change the result (allowed on
# resume, with a warning).
Role = Literal["model", "recipe", "schedule"]


def setting(default: Any, help: str, *, bound: Bound | None = None,
            choices: Callable[[], list[str]] | None = None, role: Role = "recipe",
            flag: str | None = None) -> Any:
    """A Config field with its help, bounds or choices, role and flag name (default: the
    field's name with dashes), declared once for the flags, the checks and the docs."""
    return dataclasses.field(default=default, metadata={
        "help": help, "bound": bound, "choices": choices, "role": role, "flag": flag})


def arch_setting(name: str, help: str, **kwargs: Any) -> Any:
    """A field that defaults to the arch's value (`ArchSpec.<name>`), which its help lists for
    each arch."""
    defaults = ", ".join(
        f"{arch} {value:g}" if isinstance(value := getattr(spec, name), float | int)
        else f"{arch} {value}" for arch, spec in ARCHS.items())
    return setting(None, f"{help}; default: the arch's ({defaults})", **kwargs)


class ConfigError(UserError):
    """A field out of its bounds or choices; the CLI reports it against the field's flag."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    Fields left as None take the arch's values (`ArchSpec`), so `Config(arch="seed")`
    is the original's run; after construction they always hold values.
    """

    steps: int = setting(20_000, "total number of updates (of both G and D) to train to",
                         bound=POSITIVE, role="schedule")
    arch: str = setting(DEFAULT_ARCH, "'fast': small with a 3x3 first kernel in G, "
                        "self-conditioned on 300 clusters of shapes, without dropout, with D's "
                        "convolutions spectrally normalised, at lr 5e-4 halving every 6,000 "
                        "steps, with mode seeking 0.2 (0.1 with --conditional); 'seed': the "
                        "original Keras model (widths 8/8/16, D 16/32, U[0,1) noise); 'dcgan': "
                        "the TensorFlow tutorial widths (256/128/64, D 64/128, N(0,1) noise); "
                        "'small': dcgan at half those widths, batch 64",
                        choices=lambda: sorted(ARCHS), role="model")
    conditional: bool = setting(False, "train on the labels too, so that `sample.py --digit 7` "
                                "draws 7s: G embeds the label (with --clusters, the digit's "
                                "cluster) beside the noise, D projects it onto its features",
                                role="model")
    clusters: int | None = arch_setting(
        "clusters", "condition G and D on this many k-means clusters of the training digits "
        "(--cluster-features), found without labels, G drawing the cluster from its noise (a "
        "self-conditioned GAN; 0: none); with --conditional, this many clusters within each "
        "digit, G drawing one of the asked-for digit's (default 0 there: the labels alone)",
        bound=OFF_OR_AT_LEAST_2, role="model")
    cluster_features: str | None = arch_setting(
        "cluster_features", "what --clusters' k-means compares: 'pixels', 2x2-averaged; "
        "'normalised', those centred and scaled to unit length per digit, so that digits "
        "group by shape, not by how much ink they hold", choices=lambda: list(CLUSTER_FEATURES),
        role="model")
    batch_size: int | None = arch_setting("batch_size", "images per update", bound=POSITIVE)
    learning_rate: float | None = arch_setting(
        "learning_rate", "Adam learning rate of G (and of D, times --d-lr-scale)",
        bound=POSITIVE_FINITE, flag="lr")
    lr_half_life: int | None = arch_setting(
        "lr_half_life", "steps over which both learning rates halve, smoothly (an exponential "
        "decay from step 0; 0: constant)", bound=NON_NEGATIVE)
    beta1: float | None = arch_setting("beta1", "Adam beta1", bound=UNIT_INTERVAL)
    beta2: float | None = arch_setting("beta2", "Adam beta2", bound=UNIT_INTERVAL)
    d_lr_scale: float | None = arch_setting(
        "d_lr_scale", "D's Adam learning rate as a multiple of --lr (the two time-scale update "
        "rule)", bound=POSITIVE_FINITE)
    loss: str | None = arch_setting(
        "loss", "'bce': non-saturating binary cross-entropy; 'hinge': hinge loss for D, "
        "-D(G(z)) for G", choices=lambda: list(LOSSES))
    r1_gamma: float | None = arch_setting(
        "r1_gamma", "weight of the R1 penalty, gamma/2 times D's squared gradient norm on real "
        "digits (0: none)", bound=NON_NEGATIVE_FINITE)
    r1_every: int | None = arch_setting(
        "r1_every", "steps between R1 penalties (lazy regularisation, weighted by this to match "
        "an every-step penalty)", bound=POSITIVE)
    d_dropout: float | None = arch_setting(
        "d_dropout", "dropout rate after each of D's convolutions", bound=UNIT_INTERVAL)
    translate: int | None = arch_setting(
        "translate", "shift every digit D sees, real and fake, by up to this many pixels each "
        "way (DiffAugment's translation; 0: none)", bound=NON_NEGATIVE)
    mode_seeking: float | None = arch_setting(
        "mode_seeking", "weight of the mode-seeking term in G's loss (Mao et al., 2019): the "
        "inverse of how far apart two fakes of the same class are, per unit of distance "
        "between their noises, over pairs of the batch's halves; it keeps G from drawing one "
        "style per class (0: none; fast takes 0.1 with --conditional)",
        bound=NON_NEGATIVE_FINITE)
    minibatch_std: int | None = arch_setting(
        "minibatch_std", "give D a feature of how much its batch varies: the standard "
        "deviation over each group of this many consecutive digits, averaged over D's last "
        "features and appended to them (Karras et al., 2018), so that D can tell a batch of "
        "too-alike fakes (0: none)", bound=OFF_OR_AT_LEAST_2, role="model")
    spectral_norm: str | None = arch_setting(
        "spectral_norm", "spectral normalisation in D (Miyato et al., 2018): 'convs' divides "
        "each of D's convolution kernels by its largest singular value, computed exactly at "
        "every step; 'none': no normalisation", choices=lambda: list(SPECTRAL_NORMS))
    g_first_kernel: int | None = arch_setting(
        "g_first_kernel", "side of the square kernel of G's first transposed convolution, on "
        "its 7x7 map (odd, so that 'SAME' padding is symmetric; the later ones are 5x5)",
        bound=POSITIVE_ODD, role="model")
    ema_decay: float = setting(0.999, "decay of the moving average of G's weights that sampling "
                               "uses (0: no averaging)", bound=UNIT_INTERVAL)
    latent_dim: int = setting(100, "size of the generator's noise input", bound=POSITIVE,
                              role="model")
    seed: int = setting(0, "seed of the initialisation, the data order and every random draw",
                        bound=SEED)
    log_every: int = setting(100, "steps between progress lines and metrics.jsonl records",
                             bound=POSITIVE, role="schedule")
    sample_every: int = setting(1_000, "steps between sample rows; the last step always "
                                "writes one", bound=POSITIVE, role="schedule")
    ckpt_every: int = setting(1_000, "steps between checkpoints; one is always written at the "
                              "end", bound=POSITIVE, role="schedule")
    eval_every: int = setting(2_000, "steps between measurements of sample quality (FD and IS "
                              "against the MNIST test set, and label accuracy for "
                              "--conditional), logged and shown with the losses; 0 turns them "
                              "off", bound=NON_NEGATIVE, role="schedule")
    eval_samples: int = setting(2_000, "digits drawn for each measurement (FD is biased upwards "
                                "for few; compare FDs of equal counts)",
                                bound=at_least(MIN_EVAL_SAMPLES), role="schedule")
    dtype: str = setting("float32", "compute dtype; params, optimizer state, BatchNorm "
                         "statistics and losses stay float32 (train.py's default: bfloat16 on "
                         "TPU, float32 elsewhere)", choices=lambda: list(COMPUTE_DTYPES))
    steps_per_call: int = setting(1, "updates per device call, unrolled in one compiled "
                                  "function: less per-call overhead for small models, longer "
                                  "compilation", bound=POSITIVE)
    data_on_device: bool = setting(False, "keep the whole training split on the devices and "
                                   "gather each batch there, in the same order as the host's "
                                   "tf.data stream: for GPUs and TPUs, where feeding a small "
                                   "model from the host can cost more than its update",
                                   role="schedule")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError("arch", f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        if self.conditional and self.clusters is None:
            object.__setattr__(self, "clusters", 0)
        if (self.conditional and self.mode_seeking is None
                and self.spec.conditional_mode_seeking is not None):
            object.__setattr__(self, "mode_seeking", self.spec.conditional_mode_seeking)
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is None:
                object.__setattr__(self, field.name, getattr(self.spec, field.name))
        for field in dataclasses.fields(self):
            value, bound, choices = (getattr(self, field.name), field.metadata["bound"],
                                     field.metadata["choices"])
            if bound is not None and (reason := bound.error(value)):
                raise ConfigError(field.name, reason)
            if choices is not None and value not in choices():
                raise ConfigError(field.name, f"unknown {value!r}; choose one of {choices()}")
        if self.mode_seeking and self.batch_size % 2:  # Fakes are drawn in pairs.
            raise ConfigError("batch_size", f"must be even with --mode-seeking, got "
                              f"{self.batch_size}")
        if self.minibatch_std and self.batch_size % self.minibatch_std:
            raise ConfigError("batch_size", f"must be a multiple of --minibatch-std "
                              f"({self.minibatch_std}), got {self.batch_size}")
        if self.clusters and self.latent_dim < 2:  # The noise's first entry draws the cluster.
            raise ConfigError("latent_dim", f"must be at least 2 with --clusters, got "
                              f"{self.latent_dim}")

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def label_count(self) -> int:
        """How many classes G and D are conditioned on: the digits', the clusters', the
        clusters within the digits', or 0."""
        if self.conditional:
            return NUM_CLASSES * max(self.clusters, 1)
        return self.clusters

    @staticmethod
    def fields_with(role: Role) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["role"] == role)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Config:
        """Builds a Config from parsed JSON, refusing unknown or mistyped fields."""
        if not isinstance(data, dict):
            raise UserError(f"config must be a JSON object, got {type(data).__name__}")
        types = field_types()
        data = {**SETTINGS_BEFORE_THEIR_FIELDS, **data}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise UserError(f"config has unknown field(s): {', '.join(unknown)}")
        values = {}
        for name, value in data.items():
            expected = types[name]
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
        return [f"{name} {getattr(saved, name)} -> {getattr(self, name)}"
                for name in (*self.fields_with("model"), *self.fields_with("recipe"))
                if getattr(self, name) != getattr(saved, name)]

    def check_resumable_with(self, saved: Config) -> None:
        """Refuses to continue a checkpoint whose networks have other shapes."""
        for name in self.fields_with("model"):
            ours, theirs = getattr(self, name), getattr(saved, name)
            if ours != theirs:
                raise UserError(
                    f"checkpoint was trained with {name}={theirs!r} but this run asks for "
                    f"{name}={ours!r}; use another --ckpt-dir or the same {name}"
                )


def field_types() -> dict[str, type]:
    """Each Config field's value type, without the None that some take as "the arch's"."""
    hints = typing.get_type_hints(Config)
    return {name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
            for name, hint in hints.items()}


# What every run trained with before these fields existed: a checkpoint config that
# lacks them reads as these values, whatever an arch's defaults have become since.
SETTINGS_BEFORE_THEIR_FIELDS = {"d_lr_scale": 1.0, "loss": "bce", "r1_gamma": 0.0,
                                "r1_every": 4, "d_dropout": 0.3, "translate": 0,
                                "mode_seeking": 0.0, "clusters": 0, "lr_half_life": 0,
                                "cluster_features": "pixels", "minibatch_std": 0,
                                "spectral_norm": "none", "g_first_kernel": 5}


@dataclasses.dataclass(frozen=True)
class Flag:
    """A Config field as a command-line flag."""

    field: str
    name: str  # without the dashes
    type: type
    default: Any
    help: str
    bound: Bound | None
    choices: list[str] | None


def flags() -> Iterator[Flag]:
    """The command-line flags of Config's fields, in declaration order."""
    types = field_types()
    for field in dataclasses.fields(Config):
        meta = field.metadata
        yield Flag(field.name, meta["flag"] or field.name.replace("_", "-"), types[field.name],
                   field.default, meta["help"], meta["bound"],
                   meta["choices"]() if meta["choices"] else None)


def flag_name(field: str) -> str:
    """The command-line flag (without dashes) of a Config field."""
    return next(f.name for f in flags() if f.field == field)
