"""The one configuration object of a run, and the named presets `--arch` offers.

Each field of `Config` declares its default, help, bounds or choices, role and what old
checkpoints without it read as once (`setting`): train.py builds its flags from them, and
`Config` checks the bounds, so adding a hyperparameter is one edit here plus where it is used.
A preset (`ARCHS`) is a network and the settings in which its recipe differs from those
defaults. The config is saved as JSON inside every checkpoint, so that `sample.py --ckpt`
rebuilds the exact generator from the checkpoint directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
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
class Network:
    """The widths and noise of G and D, which no flag sets.

    The generator maps `noise` to a 7x7 map with `g_dense_channels` channels, then runs
    transposed convolutions with `g_conv_channels` (strides 1, 2; the first with a
    `Config.g_first_kernel` square kernel, the others 5x5) and a final stride-2 one to a single
    channel. The discriminator has one stride-2 convolution per entry of `d_channels`.
    """

    g_dense_channels: int
    g_conv_channels: tuple[int, int]
    d_channels: tuple[int, int]
    noise: NoiseKind

    def describe(self) -> str:
        """The widths and noise in a few words, for --arch's help: "G 8/8/16, D 16/32, ..."."""
        widths = (self.g_dense_channels, *self.g_conv_channels)
        noise = {"uniform": "U[0,1)", "normal": "N(0,1)"}[self.noise]
        return (f"G {'/'.join(map(str, widths))}, D {'/'.join(map(str, self.d_channels))}, "
                f"{noise} noise")


@dataclasses.dataclass(frozen=True)
class Preset:
    """What `--arch` names: a network, the settings in which its recipe differs from the base
    recipe (each Config field's declared default), and `labelled`, those that differ again
    with --conditional. `about` says what it is, for --arch's help."""

    about: str
    network: Network
    recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    labelled: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def defaults(self, conditional: bool) -> dict[str, Any]:
        """Every setting's default under this preset, with or without --conditional."""
        return {**base_recipe(), **self.recipe, **(self.labelled if conditional else {})}


SMALL_NETWORK = Network(128, (64, 32), (32, 64), noise="normal")

# The base recipe is the original Keras model's, so `seed` changes none of it.
ARCHS: dict[str, Preset] = {
    "seed": Preset("the original Keras model", Network(8, (8, 16), (16, 32), noise="uniform")),
    # The DCGAN paper's Adam learned far faster than 1e-4 / 0.9 here (docs/quality.md).
    "dcgan": Preset("the TensorFlow DCGAN tutorial's widths, with the DCGAN paper's Adam",
                    Network(256, (128, 64), (64, 128), noise="normal"),
                    dict(batch_size=256, learning_rate=2e-4, beta1=0.5)),
    # About 8x fewer FLOPs per digit than dcgan, and better digits per CPU-minute.
    "small": Preset("dcgan at half its widths and a quarter of its batch", SMALL_NETWORK,
                    dict(learning_rate=2e-4, beta1=0.5)),
    # The levers that measured best per CPU-minute (docs/quality.md): self-conditioning on
    # clusters of the digits' shapes, no dropout in D, a higher learning rate that halves,
    # mode seeking (at half the weight with labels, which measured worse at 0.2 and 0.3), D's
    # kernels spectrally normalised, and a 3x3 kernel on G's 7x7 map (as good digits with two
    # thirds of the FLOPs). With labels, the clusters are within each digit: none by default.
    "fast": Preset("small with the levers that measured best per CPU-minute",
                   SMALL_NETWORK,
                   dict(learning_rate=5e-4, beta1=0.5, d_dropout=0.0, clusters=300,
                        cluster_features="normalised", lr_half_life=6000, mode_seeking=0.2,
                        spectral_norm="convs", g_first_kernel=3),
                   labelled=dict(clusters=0, mode_seeking=0.1)),
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


def setting(default: Any, help: str | Callable[[], str], *, bound: Bound | None = None,
            choices: Callable[[], list[str]] | None = None, role: Role = "recipe",
            flag: str | None = None, backfill: Any = dataclasses.MISSING) -> Any:
    """A Config field, declared once for the flags, the checks and the docs: its default (the
    base recipe's, which a preset may change), help (or a function that writes it), bounds or
    choices, role, flag name (default: the field's name with dashes), and `backfill`, what a
    saved config without the field reads as (what every run trained with before the field
    existed, whatever the defaults have become since; unset: the field was always saved).

    The field itself defaults to None, "not given": Config fills it in from the arch.
    """
    return dataclasses.field(default=None, metadata={
        "default": default, "help": help, "bound": bound, "choices": choices, "role": role,
        "flag": flag, "backfill": backfill})


class ConfigError(UserError):
    """A field out of its bounds or choices; the CLI reports it against the field's flag."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


def arch_help() -> str:
    """--arch's help: each preset, its network and the flags it changes, from `ARCHS`."""
    def describe(name: str, preset: Preset) -> str:
        changes = f"; {as_flags(preset.recipe)}" if preset.recipe else ""
        labelled = f"; with --conditional: {as_flags(preset.labelled)}" if preset.labelled else ""
        return f"'{name}': {preset.about} ({preset.network.describe()}{changes}{labelled})"

    presets = "; ".join(describe(name, preset) for name, preset in ARCHS.items())
    return (f"the network and recipe: {presets}; train.py's default: the arch of the checkpoint "
            f"it resumes, else {DEFAULT_ARCH}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    A field left as None takes its arch's value (`ARCHS`), else its declared default, so
    `Config(arch="seed")` is the original's run; after construction every field holds a value.
    """

    steps: int = setting(20_000, "total number of updates (of both G and D) to train to",
                         bound=POSITIVE, role="schedule")
    arch: str = setting(DEFAULT_ARCH, arch_help, choices=lambda: sorted(ARCHS), role="model")
    conditional: bool = setting(False, "train on the labels too, so that `sample.py --digit 7` "
                                "draws 7s: G embeds the label (with --clusters, the digit's "
                                "cluster) beside the noise, D projects it onto its features",
                                role="model")
    clusters: int = setting(
        0, "condition G and D on this many k-means clusters of the training digits "
        "(--cluster-features), found without labels, G drawing the cluster from its noise (a "
        "self-conditioned GAN; 0: none); with --conditional, this many clusters within each "
        "digit, G drawing one of the asked-for digit's", bound=OFF_OR_AT_LEAST_2, role="model",
        backfill=0)
    cluster_features: str = setting(
        "pixels", "what --clusters' k-means compares: 'pixels', 2x2-averaged; 'normalised', "
        "those centred and scaled to unit length per digit, so that digits group by shape, not "
        "by how much ink they hold", choices=lambda: list(CLUSTER_FEATURES), role="model",
        backfill="pixels")
    batch_size: int = setting(64, "images per update", bound=POSITIVE)
    learning_rate: float = setting(1e-4, "Adam learning rate of G (and of D, times "
                                   "--d-lr-scale)", bound=POSITIVE_FINITE, flag="lr")
    lr_half_life: int = setting(
        0, "steps over which both learning rates halve, smoothly (an exponential decay from "
        "step 0; 0: constant)", bound=NON_NEGATIVE, backfill=0)
    beta1: float = setting(0.9, "Adam beta1", bound=UNIT_INTERVAL)
    beta2: float = setting(0.999, "Adam beta2", bound=UNIT_INTERVAL)
    d_lr_scale: float = setting(
        1.0, "D's Adam learning rate as a multiple of --lr (the two time-scale update rule)",
        bound=POSITIVE_FINITE, backfill=1.0)
    loss: str = setting(
        "bce", "'bce': non-saturating binary cross-entropy; 'hinge': hinge loss for D, -D(G(z)) "
        "for G", choices=lambda: list(LOSSES), backfill="bce")
    r1_gamma: float = setting(
        0.0, "weight of the R1 penalty, gamma/2 times D's squared gradient norm on real digits "
        "(0: none)", bound=NON_NEGATIVE_FINITE, backfill=0.0)
    r1_every: int = setting(
        4, "steps between R1 penalties (lazy regularisation, weighted by this to match an "
        "every-step penalty)", bound=POSITIVE, backfill=4)
    d_dropout: float = setting(0.3, "dropout rate after each of D's convolutions",
                               bound=UNIT_INTERVAL, backfill=0.3)
    translate: int = setting(
        0, "shift every digit D sees, real and fake, by up to this many pixels each way "
        "(DiffAugment's translation; 0: none)", bound=NON_NEGATIVE, backfill=0)
    mode_seeking: float = setting(
        0.0, "weight of the mode-seeking term in G's loss (Mao et al., 2019): the inverse of how "
        "far apart two fakes of the same class are, per unit of distance between their noises, "
        "over pairs of the batch's halves; it keeps G from drawing one style per class (0: "
        "none)", bound=NON_NEGATIVE_FINITE, backfill=0.0)
    minibatch_std: int = setting(
        0, "give D a feature of how much its batch varies: the standard deviation over each "
        "group of this many consecutive digits, averaged over D's last features and appended "
        "to them (Karras et al., 2018), so that D can tell a batch of too-alike fakes (0: none)",
        bound=OFF_OR_AT_LEAST_2, role="model", backfill=0)
    spectral_norm: str = setting(
        "none", "spectral normalisation in D (Miyato et al., 2018): 'convs' divides each of D's "
        "convolution kernels by its largest singular value, computed exactly at every step; "
        "'none': no normalisation", choices=lambda: list(SPECTRAL_NORMS), backfill="none")
    g_first_kernel: int = setting(
        5, "side of the square kernel of G's first transposed convolution, on its 7x7 map (odd, "
        "so that 'SAME' padding is symmetric; the later ones are 5x5)", bound=POSITIVE_ODD,
        role="model", backfill=5)
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
        self._fill(base_recipe(), ("arch", "conditional"))  # what the arch's defaults depend on
        if self.arch not in ARCHS:
            raise ConfigError("arch", f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        self._fill(ARCHS[self.arch].defaults(self.conditional))
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

    def _fill(self, defaults: Mapping[str, Any], names: Iterable[str] | None = None) -> None:
        """Sets the fields not given (None) among `names` (default: all of `defaults`') to
        their `defaults`."""
        for name in defaults if names is None else names:
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])

    @property
    def network(self) -> Network:
        return ARCHS[self.arch].network

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
        data = {**backfills(), **data}
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
    """Each Config field's value type."""
    return typing.get_type_hints(Config)


def base_recipe() -> dict[str, Any]:
    """Each setting's declared default: the recipe that a preset changes."""
    return {field.name: field.metadata["default"] for field in dataclasses.fields(Config)}


def backfills() -> dict[str, Any]:
    """What a saved config reads as where it lacks a field (`setting`'s `backfill`)."""
    return {field.name: field.metadata["backfill"] for field in dataclasses.fields(Config)
            if field.metadata["backfill"] is not dataclasses.MISSING}


def show(value: Any) -> str:
    """A setting's value as a flag takes it: 0.0005, 300, normalised."""
    return f"{value:g}" if isinstance(value, float | int) else str(value)


def flag_words(values: Mapping[str, Any], text: Callable[[Any], str] = str) -> list[str]:
    """Settings as the command-line words that set them, each value written by `text` (str:
    exactly, as a command that repeats a run needs); a switch is its flag where on, nothing
    where off."""
    words: list[str] = []
    for name, value in values.items():
        flag = f"--{flag_name(name)}"
        words += ([flag] if value else []) if isinstance(value, bool) else [flag, text(value)]
    return words


def as_flags(values: Mapping[str, Any]) -> str:
    """Settings as the flags that set them, to read: "--lr 0.0005 --clusters 300"."""
    return " ".join(flag_words(values, show))


def per_arch(values: Mapping[str, Any]) -> str:
    """Each arch's value of a setting: "seed 0, dcgan 0, small 0, fast 300"."""
    return ", ".join(f"{arch} {show(value)}" for arch, value in values.items())


def arch_defaults(name: str) -> str | None:
    """Each arch's default of setting `name`, for its help ("seed 0, ..., fast 300; with
    --conditional: fast 0": those that --conditional changes), or None where all are the same."""
    plain = {arch: preset.defaults(False)[name] for arch, preset in ARCHS.items()}
    labelled = {arch: value for arch, preset in ARCHS.items()
                if (value := preset.defaults(True)[name]) != plain[arch]}
    if len(set(plain.values())) == 1 and not labelled:
        return None
    return per_arch(plain) + (f"; with --conditional: {per_arch(labelled)}" if labelled else "")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A Config field as a command-line flag: its default is None where the arches' differ,
    and its help then lists them."""

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
        help = meta["help"]() if callable(meta["help"]) else meta["help"]
        by_arch = arch_defaults(field.name)
        yield Flag(field.name, flag_name(field.name), types[field.name],
                   None if by_arch else meta["default"],
                   f"{help}; default: the arch's ({by_arch})" if by_arch else help,
                   meta["bound"], meta["choices"]() if meta["choices"] else None)


def flag_name(field: str) -> str:
    """The command-line flag (without dashes) of a Config field."""
    meta = next(f.metadata for f in dataclasses.fields(Config) if f.name == field)
    return meta["flag"] or field.replace("_", "-")
