"""Train the Digitscape DCGAN on MNIST: `python train.py --steps 20000`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from digitscape_jax import cli, xla_flags
from digitscape_jax import config


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Config field, with the field's help and choices; its bounds are Config's to
    check (`parse_args`). Flags whose default is the arch's stay None, for Config to fill in."""
    for flag in config.flags():
        if flag.type is bool:
            p.add_argument(f"--{flag.name}", dest=flag.field, action="store_true", help=flag.help)
            continue
        if flag.choices is not None:
            kind = {"choices": flag.choices}
        else:
            kind = {"type": cli.parse_number(flag.type, flag.bound, check=False)}
        # None: the platform's dtype, and the arch of a checkpoint resumed (`parse_args`).
        default = None if flag.field in ("dtype", "arch") else flag.default
        p.add_argument(f"--{flag.name}", dest=flag.field, default=default, help=flag.help,
                       metavar=None if flag.choices else flag.name.upper().replace("-", "_"),
                       **kind)


def build_parser() -> cli.ArgumentParser:
    """train.py's flags: Config's fields, then where the run reads and writes, then how
    processes join."""
    p = cli.ArgumentParser(
        description="Train a DCGAN on MNIST. Rerunning the same command resumes from the "
                    "latest checkpoint in --ckpt-dir and trains up to --steps in total.",
        formatter_class=cli.HelpFormatter,
    )
    add_config_flags(p)
    p.add_argument("--ckpt-dir", type=Path, default=Path("ckpt"),
                   help="checkpoints (last 3 kept), metrics.jsonl, losses.png, progress.gif, "
                        "real_images.png and the final generated_images.png")
    p.add_argument("--samples-dir", type=Path, default=Path("generated_images"),
                   help="where a row of 10 digits from fixed noise is written every --sample-every "
                        "steps, as generated_images_<step>.png")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="offline source: a folder with the four MNIST IDX .gz files "
                        "(train-images-idx3-ubyte.gz, ...), prepared once into --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="tensorflow-datasets data dir (default: tfds's, ~/tensorflow_datasets)")
    p.add_argument("--compile-cache", metavar="DIR",
                   default=os.environ.get("JAX_COMPILATION_CACHE_DIR", xla_flags.DEFAULT_CACHE_DIR),
                   help="where compiled steps are kept, so that a rerun does not compile again; "
                        "'' turns the cache off (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/digitscape_jax/xla)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events (scalars and sample rows) to "
                        "<ckpt-dir>/tensorboard")
    multi = p.add_argument_group(
        "many processes", "one train.py per host (or per GPU), all with the same flags; "
                          "process 0 writes the files, so --ckpt-dir must be a shared folder")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run whose cluster JAX detects itself "
                            "(Cloud TPU pods, SLURM, Open MPI)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="join a multi-process run coordinated by process 0 at HOST:PORT; "
                            "needs --num-processes and --process-id")
    multi.add_argument("--num-processes", type=cli.positive_int, default=None,
                       help="processes in the run")
    multi.add_argument("--process-id", type=cli.non_negative_int, default=None,
                       help="this process's index, 0..num-processes-1")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    cluster = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in cluster) and any(v is None for v in cluster):
        p.error("--coordinator, --num-processes and --process-id go together")
    if args.process_id is not None and args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    args.distributed = args.distributed or args.coordinator is not None
    if args.arch is None:  # A rerun without --arch resumes whatever arch it trained.
        args.arch = resumed_arch(args.ckpt_dir)
    try:
        config_from_args(args)
    except config.ConfigError as e:
        p.error(f"argument --{config.flag_name(e.field)}: {e.reason}")
    return args


def resumed_arch(ckpt_dir: Path) -> str | None:
    """The arch of the checkpoints in `ckpt_dir`, or None where it holds none."""
    if not ckpt_dir.is_dir():
        return None
    from digitscape_jax.checkpointing import saved_arch  # loads JAX: only where one may be

    return saved_arch(ckpt_dir)


def config_from_args(args: argparse.Namespace, default_dtype: str = "float32") -> config.Config:
    """The run's Config from parsed flags; the unset ones (None) take Config's defaults, and
    an unset --dtype `default_dtype`."""
    values = {f.field: getattr(args, f.field) for f in config.flags()}
    values["dtype"] = values["dtype"] or default_dtype
    return config.Config(**{name: value for name, value in values.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Imported here so that --help and flag errors answer without loading JAX and TensorFlow.
    from digitscape_jax import parallel
    from digitscape_jax.trainer import RunPaths, train

    if args.distributed:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.compile_cache:
        xla_flags.use_compilation_cache(args.compile_cache)
    train(config_from_args(args, parallel.default_dtype()),
          RunPaths(args.ckpt_dir, args.samples_dir, args.data_dir, args.mnist_idx, args.tensorboard))


if __name__ == "__main__":
    sys.exit(cli.run(main))
