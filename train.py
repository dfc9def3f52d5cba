"""Train the Digitscape DCGAN on MNIST: `python train.py --steps 20000`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from digitscape_jax import cli, xla_flags
from digitscape_jax.config import ARCHS, COMPUTE_DTYPES, DEFAULT_ARCH, MIN_EVAL_SAMPLES, Config


def parse_args(argv: Sequence[str] | None = None):
    defaults = Config()
    p = cli.ArgumentParser(
        description="Train a DCGAN on MNIST. Rerunning the same command resumes from the "
                    "latest checkpoint in --ckpt-dir and trains up to --steps in total.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--steps", type=cli.positive_int, default=defaults.steps,
                   help="total number of updates (of both G and D) to train to")
    p.add_argument("--arch", choices=sorted(ARCHS), default=DEFAULT_ARCH,
                   help="'seed': the original Keras model (widths 8/8/16, D 16/32, U[0,1) noise); "
                        "'dcgan': the TensorFlow tutorial widths (256/128/64, D 64/128, N(0,1) noise)")
    p.add_argument("--conditional", action="store_true",
                   help="train on the labels too, so that `sample.py --digit 7` draws 7s: G embeds "
                        "the label beside the noise, D projects it onto its features")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="images per update; default: the arch's (seed 64, dcgan 256)")
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="Adam learning rate of both G and D; default: the arch's (seed 1e-4, "
                        "dcgan 2e-4)")
    p.add_argument("--beta1", type=cli.unit_interval, default=None,
                   help="Adam beta1; default: the arch's (seed 0.9, dcgan 0.5)")
    p.add_argument("--beta2", type=cli.unit_interval, default=defaults.beta2, help="Adam beta2")
    p.add_argument("--ema-decay", type=cli.unit_interval, default=defaults.ema_decay,
                   help="decay of the moving average of G's weights that sampling uses "
                        "(0: no averaging)")
    p.add_argument("--latent-dim", type=cli.positive_int, default=defaults.latent_dim,
                   help="size of the generator's noise input")
    p.add_argument("--seed", type=cli.seed, default=defaults.seed,
                   help="seed of the initialisation, the data order and every random draw")
    p.add_argument("--ckpt-dir", type=Path, default=Path("ckpt"),
                   help="checkpoints (last 3 kept), metrics.jsonl, losses.png, progress.gif, "
                        "real_images.png and the final generated_images.png")
    p.add_argument("--samples-dir", type=Path, default=Path("generated_images"),
                   help="where a row of 10 digits from fixed noise is written every --sample-every "
                        "steps, as generated_images_<step>.png")
    p.add_argument("--log-every", type=cli.positive_int, default=defaults.log_every,
                   help="steps between progress lines and metrics.jsonl records")
    p.add_argument("--sample-every", type=cli.positive_int, default=defaults.sample_every,
                   help="steps between sample rows")
    p.add_argument("--ckpt-every", type=cli.positive_int, default=defaults.ckpt_every,
                   help="steps between checkpoints; one is always written at the end")
    p.add_argument("--eval-every", type=cli.non_negative_int, default=defaults.eval_every,
                   help="steps between measurements of sample quality (FD and IS against the "
                        "MNIST test set, and label accuracy for --conditional), logged and shown "
                        "with the losses; 0 turns them off")
    p.add_argument("--eval-samples", type=cli.at_least(MIN_EVAL_SAMPLES),
                   default=defaults.eval_samples,
                   help="digits drawn for each measurement (FD is biased upwards for few; "
                        "compare FDs of equal counts)")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="offline source: a folder with the four MNIST IDX .gz files "
                        "(train-images-idx3-ubyte.gz, ...), prepared once into --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="tensorflow-datasets data dir (default: tfds's, ~/tensorflow_datasets)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="compute dtype; params, optimizer state, BatchNorm statistics and losses "
                        "stay float32. Default: bfloat16 on TPU, float32 elsewhere")
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
    p.add_argument("--steps-per-call", type=cli.positive_int, default=defaults.steps_per_call,
                   help="updates per device call, unrolled in one compiled function: less "
                        "per-call overhead for small models, longer compilation")
    p.add_argument("--data-on-device", action="store_true",
                   help="keep the whole training split on the devices and gather each batch "
                        "there, in the same order as the host's tf.data stream: for GPUs and "
                        "TPUs, where feeding a small model from the host can cost more than "
                        "its update")
    p.add_argument("--compile-cache", metavar="DIR",
                   default=os.environ.get("JAX_COMPILATION_CACHE_DIR", xla_flags.DEFAULT_CACHE_DIR),
                   help="where compiled steps are kept, so that a rerun does not compile again; "
                        "'' turns the cache off (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/digitscape_jax/xla)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events (scalars and sample rows) to "
                        "<ckpt-dir>/tensorboard")
    args = p.parse_args(argv)
    cluster = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in cluster) and any(v is None for v in cluster):
        p.error("--coordinator, --num-processes and --process-id go together")
    if args.process_id is not None and args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    args.distributed = args.distributed or args.coordinator is not None
    return args


def config_from_args(args, default_dtype: str = "float32") -> Config:
    """The run's Config from parsed flags; unset --batch-size, --lr and --beta1 are the arch's."""
    return Config(
        arch=args.arch,
        latent_dim=args.latent_dim,
        conditional=args.conditional,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        seed=args.seed,
        dtype=args.dtype or default_dtype,
        ema_decay=args.ema_decay,
        steps_per_call=args.steps_per_call,
        data_on_device=args.data_on_device,
        steps=args.steps,
        log_every=args.log_every,
        sample_every=args.sample_every,
        ckpt_every=args.ckpt_every,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Imported here so that --help and flag errors answer without loading JAX and TensorFlow.
    from digitscape_jax import parallel
    from digitscape_jax.trainer import RunPaths, train

    if args.distributed:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.compile_cache:
        xla_flags.use_compilation_cache(args.compile_cache)
    config = config_from_args(args, parallel.default_dtype())
    train(config, RunPaths(args.ckpt_dir, args.samples_dir, args.data_dir, args.mnist_idx,
                           args.tensorboard))


if __name__ == "__main__":
    sys.exit(cli.run(main))
