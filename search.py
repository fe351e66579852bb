"""The Hamming radius for coarse-to-fine retrieval: how precision, mAP and time change with it.

    python search.py --bits 48                          # radii 0..24 on 1,000 labelled queries
    python search.py --bits 48 --max-radius 8 --queries 0   # radii 0..8 on every labelled query

For each radius r = 0..--max-radius (default bits/2), the candidates of a query are the database items within
Hamming distance r, re-ranked by fc7 Euclidean distance (equal distances in mAP.py's tie order). Per radius:
  candidates     mean number of candidates
  precision@10   relevant among the first min(10, candidates), over that number (a query with no candidate counts
                 0, as in the original)
  mAP            AP of the re-ranked candidate list, normalised by the relevant candidates (0 when none)
  ms/query       the real coarse-to-fine retrieval of the top 10 at that radius (mAP.py's, as query.py runs it,
                 Hamming distances included), timed on the first --time-queries queries of the sample
Relevant = sharing a label (mAP.relevance); queries and database items without a label take no part.

Recommended radius: among the radii whose mean candidate count reaches --topk (10; all N when the database is
smaller), the smallest whose precision@10 is within --tolerance (0.005) of the best of them: as precise as any larger
radius, at the least cost. When no radius reaches --topk, the largest. query.py and demo.py use it as their default
--radius (as long as it was measured on the same model).

Writes result/search_<bits>bits.csv (the table), .png (the curves) and .json (table, recommendation, args).
"""
import argparse
import time
from pathlib import Path

import numpy as np

import database
import mAP
from net import pick_device
from stage import (UserError, atomic_write, common_args_parser, elapsed, non_negative_float, non_negative_int, positive_int,
                   print_args, run_main, write_json, write_text)

COLUMNS = ("radius", "candidates", "precision@10", "mAP", "ms/query")
PRECISION_DEPTH = 10  # the 10 of precision@10, and the results a timed retrieval returns


def get_args_parser():
    parser = argparse.ArgumentParser("search.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(data_root=False),
                                              mAP.retrieval_args_parser(result_help="folder for the table, figure and JSON")],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-radius", type=non_negative_int, default=None, help="largest radius studied (default: bits/2)")
    parser.add_argument("--queries", type=non_negative_int, default=1000,
                        help="labelled queries in the study, a seeded sample; 0 for all (default: %(default)s)")
    parser.add_argument("--time-queries", type=non_negative_int, default=20,
                        help="queries the retrieval time is measured on (default: %(default)s)")
    parser.add_argument("--topk", type=positive_int, default=10,
                        help="results a query needs: the recommended radius holds this many on average (default: %(default)s)")
    parser.add_argument("--tolerance", type=non_negative_float, default=0.005,
                        help="precision@10 below the best that still counts as the best (default: %(default)s)")
    return parser


def sample(count, size):
    """A seeded sample of range(count), in order; all when size is 0 or at least count."""
    if size <= 0 or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, size=size, replace=False))


def recommend(rows, enough, tolerance):
    """The recommendation rule of the module docstring; rows are dicts with the table's columns."""
    eligible = [row for row in rows if row["candidates"] >= enough] or rows[-1:]
    best = max(row["precision@10"] for row in eligible)
    return min(row["radius"] for row in eligible if row["precision@10"] >= best - tolerance)


def plot(path, rows, recommended, bits):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = [row["radius"] for row in rows]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(10, 4))
    quality.plot(radii, [row["precision@10"] for row in rows], marker="o", markersize=3, label="precision@10")
    quality.plot(radii, [row["mAP"] for row in rows], marker="s", markersize=3, label="mAP of the candidates")
    quality.set(xlabel="Hamming radius", ylim=(0, 1.02), title=f"{bits} bits: quality within radius r")
    cost.plot(radii, [max(row["candidates"], 1e-1) for row in rows], marker="o", markersize=3, color="C2")
    cost.set(xlabel="Hamming radius", ylabel="mean candidates", yscale="log", title="cost")
    times = cost.twinx()
    times.plot(radii, [row["ms/query"] for row in rows], marker="s", markersize=3, color="C3")
    times.set_ylabel("ms per query", color="C3")
    for axes in (quality, cost):
        axes.axvline(recommended, color="grey", linestyle="--", linewidth=1)
        axes.grid(alpha=0.3)
    quality.legend(loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def main():
    args = get_args_parser().parse_args()
    max_radius = args.bits // 2 if args.max_radius is None else args.max_radius
    if not 0 <= max_radius <= args.bits:
        raise UserError(f"--max-radius {args.max_radius}: give a radius between 0 and --bits {args.bits}")
    if args.topk < 1 or args.time_queries < 0:
        raise UserError("--topk must be positive and --time-queries not negative")
    args.max_radius = max_radius
    print_args(args)
    started = time.perf_counter()
    device = pick_device(args.device)
    db, query, meta = database.load_database(args.database, args.bits, features=True)
    items = mAP.items_for_metrics(db, args, device, features=True)
    take = mAP.labelled_queries(query, args)
    take = take[sample(len(take), args.queries)]
    codes, labels, features = query.codes[take], query.labels[take], np.asarray(query.features[take])
    radii = list(range(max_radius + 1))
    study = mAP.radius_study(items, codes, labels, features, radii, depth=PRECISION_DEPTH)
    timed = min(args.time_queries, len(take))
    rows = []
    for j, radius in enumerate(radii):
        seconds = float("nan")  # not timed (--time-queries 0): nan in the table, null in the JSON
        if timed:
            tic = time.perf_counter()
            mAP.coarse_to_fine(items, codes[:timed], features[:timed], radius, PRECISION_DEPTH, grow=False)
            seconds = (time.perf_counter() - tic) / timed
        rows.append({"radius": radius, "candidates": float(study["candidates"][:, j].mean()),
                     "precision@10": float(study["precision"][:, j].mean()), "mAP": float(study["ap"][:, j].mean()),
                     "ms/query": 1000 * seconds})
    recommended = recommend(rows, min(args.topk, items.size), args.tolerance)
    stem = Path(args.result) / f"search_{args.bits}bits"
    write_text(stem.with_suffix(".csv"), ",".join(COLUMNS) + "\n" + "".join(
        f"{row['radius']},{row['candidates']:.3f},{row['precision@10']:.6f},{row['mAP']:.6f},{row['ms/query']:.4f}\n"
        for row in rows))
    plot(stem.with_suffix(".png"), rows, recommended, args.bits)
    write_json(stem.with_suffix(".json"), {
        "recommended_radius": recommended,
        "rule": f"smallest radius with mean candidates >= {min(args.topk, items.size)} and precision@10 within "
                f"{args.tolerance} of the best such radius",
        "rows": rows, "bits": args.bits, "num_queries": len(take), "num_database": items.size,
        "skipped_database": int(len(db.labels) - items.size), "ties": args.ties, "model": meta.get("model"),
        "model_sha256": meta.get("model_sha256"), "device": str(device), "seconds": elapsed(started),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
    })
    print(f"{'radius':>6} {'candidates':>11} {'precision@10':>13} {'mAP':>8} {'ms/query':>9}")
    for row in rows:
        mark = "  <- recommended" if row["radius"] == recommended else ""
        print(f"{row['radius']:>6} {row['candidates']:>11.1f} {row['precision@10']:>13.4f} {row['mAP']:>8.4f} "
              f"{row['ms/query']:>9.3f}{mark}")
    print(f"recommended radius {recommended} ({len(take)} queries, {items.size} database items); wrote "
          f"{stem}.csv, .png, .json in {elapsed(started)} s")


if __name__ == "__main__":
    run_main(main)
