"""Why the feature spaces disagree: FD per class and per term, pixel statistics, worst samples.

Run from the repository root:

    python bench/spaces.py --mnist-idx ../shared/mnist --png docs/worst_samples.png \\
        default=../shared/judged/default_fast_20k.npz \\
        demo=../shared/judged/demo_fast_conditional.npz

It prints markdown tables, and with --record DIR writes them as a result record, from which
`python -m digitscape_jax.report` writes docs/spaces.md's tables: each set against the 10,000 MNIST
test digits in both feature spaces of `evaluator.Evaluator`:

1. FD at equal size and class mix: each set's first 8,800 digits, and a conditional set's
   digits resampled to the test set's class mix (the first of each class, 8,800 in all),
   beside 8,800 real training digits; FD split into its mean term |mu1 - mu2|^2 and its
   covariance term.
2. FD per class: a conditional set's digits by requested label, an unconditional one's by
   the selection classifier's class, against the test digits of that class, beside as many
   real training digits of that class (real-vs-real).
3. Pixel statistics: mean ink, the fractions of faint (1-31), grey (32-223) and full
   (224-255) pixels, the pixels above 128, and a stroke width (2 x the pixels above 128 over
   those of them with a 4-neighbour at or below 128).
4. The same FDs after each set's pixels are mapped onto the real digits' pixel-value
   distribution (quantile matching over all pixels): how much of each space's FD the
   intensity profile alone explains.
5. The worst-scored samples in each space: a sample's score is the distance from its
   features to its k-th nearest test digit's, over the median k-NN radius of the test digits
   themselves (so 1 is typical of a real digit); the overlap of the two spaces' worst 5%, and
   the nearest training digit (pixel L2) of each worst sample. --png draws, per set, the 10
   worst in the selection space over their nearest training digits, then the same for the
   held-out space.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from digitscape_jax import cli, data, records
from digitscape_jax.evaluate import read_npz
from digitscape_jax.evaluator import Evaluator
from digitscape_jax.plots import image_grid, save_image
from digitscape_jax.sample_metrics import K, feature_stats, frechet_distance, knn_radii
from digitscape_jax.sampling import MNIST_TEST_CLASS_COUNTS, proportional_counts

EQUAL_N = 8800  # the independent scorer's size for the resampled conditional set
WORST = 10  # samples drawn per space and set
WORST_FRACTION = 0.05  # of each set, whose overlap between the spaces is reported


def named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npz, got {text!r}")
    return name, Path(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=cli.HelpFormatter)
    p.add_argument("sets", nargs="+", type=named_path, metavar="NAME=FILE.npz",
                   help="generated digits, as sample.py --npz writes them")
    p.add_argument("--mnist-idx", type=Path, required=True, metavar="DIR",
                   help="the four MNIST IDX .gz files")
    p.add_argument("--png", type=Path, default=None,
                   help="draw the worst samples of each space here")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="also write the tables as a result record, DIR/spaces.json")
    return p.parse_args(argv)


def fd_terms(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """FD between feature sets a and b, and its mean and covariance terms."""
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    fd = frechet_distance(mu1, s1, mu2, s2)
    mean = float(np.sum((mu1 - mu2) ** 2))
    return fd, mean, fd - mean


def resample_to_mix(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first digits of each class, in counts proportional to the test set's."""
    counts = proportional_counts(n, MNIST_TEST_CLASS_COUNTS)
    return np.concatenate([np.flatnonzero(labels == c)[:m] for c, m in enumerate(counts)])


def match_histogram(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`images` with their pixel values mapped onto `reference`'s distribution (by rank)."""
    flat = images.reshape(-1)
    order = np.argsort(flat, kind="stable")
    quantiles = np.sort(reference.reshape(-1))
    positions = np.linspace(0, len(quantiles) - 1, len(flat)).round().astype(np.int64)
    out = np.empty_like(flat)
    out[order] = quantiles[positions]
    return out.reshape(images.shape)


def pixel_stats(images: np.ndarray) -> dict[str, float]:
    x = images.astype(np.int32)
    on = x > 128
    padded = np.pad(on, ((0, 0), (1, 1), (1, 1)))
    inner = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
             & padded[:, 1:-1, 2:])
    boundary = (on & ~inner).sum((1, 2))
    width = 2 * on.sum((1, 2)) / np.maximum(boundary, 1)
    return {"ink": float(x.mean() / 255), "faint": float(np.mean((x >= 1) & (x <= 31))),
            "grey": float(np.mean((x >= 32) & (x <= 223))), "full": float(np.mean(x >= 224)),
            "above 128": float(on.mean()), "on pixels / digit": float(on.sum((1, 2)).mean()),
            "stroke width": float(width.mean()),
            "stroke width p10-p90":
                f"{np.percentile(width, 10):.2f}-{np.percentile(width, 90):.2f}"}


class Tables:
    """The tables of a run: printed as markdown as they come, and kept for the record."""

    def __init__(self) -> None:
        self.kept: list[dict[str, object]] = []

    def add(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
        self.kept.append({"title": title, "header": list(header), "rows": cells})
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        print(f"\n## {title}\n\n" + "\n".join(lines + ["| " + " | ".join(row) + " |"
                                                      for row in cells]))


def nearest_train(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Index of each digit's nearest training digit, by pixel L2."""
    q = images.reshape(len(images), -1).astype(np.float32) / 255
    t = train.reshape(len(train), -1).astype(np.float32) / 255
    d = (q * q).sum(1)[:, None] + (t * t).sum(1)[None] - 2 * q @ t.T
    return d.argmin(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    (train, train_labels), (test, test_labels) = (data.read_idx_split(args.mnist_idx, s)
                                                  for s in ("train", "test"))
    evaluator = Evaluator(test, train, test_labels=test_labels)
    spaces = evaluator.spaces
    real_idx = np.random.default_rng(0).permutation(len(train))[:10_000]
    real, real_labels = train[real_idx], train_labels[real_idx]
    sets = {name: read_npz(path) for name, path in args.sets}
    features = {name: {s: sp.classify(images)[0] for s, sp in spaces.items()}
                for name, (images, _) in [("real train", (real, None)), *sets.items()]}
    predicted = {name: spaces["selection"].classify(images)[1].argmax(1)
                 for name, (images, _) in sets.items()}
    test_features = {s: sp.test_features for s, sp in spaces.items()}

    # 1. FD at equal size and class mix, and its terms.
    rows = []
    variants = [("real train", "first 8,800", np.arange(EQUAL_N))]
    for name, (images, labels) in sets.items():
        variants.append((name, "first 8,800", np.arange(EQUAL_N)))
        if labels is not None:
            variants.append((name, "test class mix, 8,800", resample_to_mix(labels, EQUAL_N)))
    for name, how, idx in variants:
        row: list[object] = [name, how]
        for s in spaces:
            fd, mean, cov = fd_terms(features[name][s][idx], test_features[s])
            row += [fd, mean, cov]
        real_fd = {s: fd_terms(features["real train"][s][:EQUAL_N], test_features[s])[0]
                   for s in spaces}
        row += [f"{row[2] / real_fd['selection']:.2f} / {row[5] / real_fd['held_out']:.2f}"]
        rows.append(row)
    tables = Tables()
    tables.add("FD at equal size, against the 10,000 test digits", ["set", "digits", "selection FD", "mean term", "cov term", "held-out FD",
                 "mean term", "cov term", "x real (selection / held-out)"], rows)

    # 2. FD per class.
    for name, (images, labels) in sets.items():
        classes = labels if labels is not None else predicted[name]
        how = "requested label" if labels is not None else "selection classifier's class"
        rows = []
        for c in range(10):
            idx = np.flatnonzero(classes == c)[:1000]
            ref = np.flatnonzero(test_labels == c)
            real_c = np.flatnonzero(real_labels == c)[:len(idx)]
            row: list[object] = [c, len(idx)]
            for s in spaces:
                fake = fd_terms(features[name][s][idx], test_features[s][ref])[0]
                base = fd_terms(features["real train"][s][real_c], test_features[s][ref])[0]
                row += [fake, base, f"{fake / base:.1f}"]
            rows.append(row)
        tables.add(f"FD per class: {name} (classes by {how}), against the test digits of the "
                   "class", ["class", "n", "selection FD", "real", "x real", "held-out FD", "real",
                     "x real"], rows)

    # 3. Pixel statistics.
    stats = {"real train": pixel_stats(real), "real test": pixel_stats(test),
             **{name: pixel_stats(images) for name, (images, _) in sets.items()}}
    keys = list(next(iter(stats.values())))
    tables.add("Pixel statistics (pixel fractions of all 784; width in pixels)", ["set", *keys],
               [[name, *s.values()] for name, s in stats.items()])

    # 4. FD after matching the pixel histogram to the real digits'.
    rows = []
    for name, (images, _) in sets.items():
        matched = match_histogram(images, real)
        row: list[object] = [name]
        for s, sp in spaces.items():
            before = fd_terms(features[name][s], test_features[s])[0]
            after = fd_terms(sp.classify(matched)[0], test_features[s])[0]
            row += [before, after]
        rows.append(row)
    tables.add("FD before and after matching each set's pixel histogram to the real digits'",
               ["set", "selection FD", "matched", "held-out FD", "matched"], rows)

    # 5. The worst-scored samples.
    scores = {}
    for s in spaces:
        reference = test_features[s]
        typical = float(np.sqrt(np.median(knn_radii(reference, K))))
        for name in sets:
            # distance to the k-th nearest test digit (the sample is not one of them)
            kth = knn_to(features[name][s], reference, K)
            scores[name, s] = kth / typical
    rows, panels = [], []
    for name, (images, _) in sets.items():
        a, b = scores[name, "selection"], scores[name, "held_out"]
        m = int(len(a) * WORST_FRACTION)
        overlap = len(set(np.argsort(-a)[:m]) & set(np.argsort(-b)[:m])) / m
        rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        spearman = float(np.corrcoef(rank_a, rank_b)[0, 1])
        for s in spaces:
            worst = np.argsort(-scores[name, s])[:WORST]
            near = nearest_train(images[worst], train)
            distance = np.sqrt(((images[worst].astype(np.float32) - train[near]) ** 2 / 255 ** 2)
                               .sum((1, 2)))
            agree = np.mean(predicted[name][worst] == train_labels[near])
            rows.append([name, s, float(np.median(scores[name, s])),
                         float(np.mean(scores[name, s][worst])), f"{overlap:.2f}",
                         f"{spearman:.2f}", float(np.mean(distance)), f"{agree:.1f}",
                         " ".join(str(c) for c in predicted[name][worst])])
            panels += [images[worst], train[near]]
    tables.add(f"Per-sample scores (k-th nearest test digit / its median, k = {K})",
               ["set", "space", "median score", f"worst {WORST}: mean score",
                f"worst {WORST_FRACTION:.0%} shared", "rank correlation",
                "worst: pixel L2 to nearest train", "nearest train's label = class",
                "worst: selection classes"], rows)
    if args.png is not None:
        names = [f"{name}: {what}" for name in sets
                 for what in ("worst, selection", "nearest train", "worst, held-out",
                              "nearest train")]
        print(f"\nworst samples -> {save_image(args.png, labelled_grid(panels, names))}")
    if args.record is not None:
        command = ("python bench/spaces.py --mnist-idx ../shared/mnist --png docs/worst_samples.png "
                   + " ".join(f"{name}={path}" for name, path in args.sets)
                   + " --record docs/results/")
        record = records.make("analysis", "spaces", command, {"tables": tables.kept})
        print(f"record -> {records.write(args.record, record)}")


def labelled_grid(rows: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The digits of each row side by side, each row's name to its left."""
    from PIL import Image, ImageDraw

    grid = image_grid(np.concatenate(rows), len(rows), len(rows[0]))
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    margin = 12 + int(max(draw.textlength(n) for n in names))
    canvas = Image.new("L", (margin + grid.shape[1], grid.shape[0]), 255)
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    step = grid.shape[0] / len(rows)
    for i, name in enumerate(names):
        draw.text((4, int(i * step + step / 2 - 5)), name, fill=0)
    return np.asarray(canvas)


def knn_to(queries: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Distance (Q,) from each query to its k-th nearest of `points` (none of them itself)."""
    points = np.asarray(points, np.float32)
    points_sq = (points ** 2).sum(1)
    out = []
    for i in range(0, len(queries), 1000):
        q = np.asarray(queries[i:i + 1000], np.float32)
        d = np.maximum((q ** 2).sum(1)[:, None] + points_sq[None] - 2 * q @ points.T, 0)
        out.append(np.sqrt(np.partition(d, k - 1, axis=1)[:, k - 1]))
    return np.concatenate(out)


if __name__ == "__main__":
    sys.exit(cli.run(main))
