"""Exact Hamming ranking speed: mAP.py's evaluation against the original's method, and top-k against faiss.

    python bench/search.py                    # the sizes of issue 4 (several minutes on 2 CPU cores)
    python bench/search.py --scale 0.1        # every size a tenth, for a quick look
    python bench/search.py --device cuda      # mAP.py's GPU path (faiss stays on the CPU)

1. mAP.py's whole evaluation (mAP over the full ranking, mAP@1000, P@k curve, PR within every radius) of 10,000
   queries against 200,000 48-bit codes with class structure and many ties, in this process, against the original's
   per-query method (np.count_nonzero(q != db) on 0/1 int32 codes, np.argsort, cumulative-sum AP for mAP and
   mAP@1000) timed on --baseline-queries queries and scaled to all of them. Then mAP.py itself, run on the same codes
   written as a database (no feature files: without --rerank it reads none): its wall time and peak memory (RSS).
   A check: the first queries' AP equals a stable argsort on the shuffled database (the ranking rule, done slowly).
2. Top-100 for 1,000 queries against 1,000,000 64-bit codes: mAP.topk against faiss IndexBinaryFlat
   (faiss-cpu, when it can be imported: pip install faiss-cpu; it is no requirement), both on --threads threads,
   ties in database order for both; the results are compared.
Prints a table and writes result/bench_search.json. Ratios are what to compare: this machine is shared and noisy,
so both sides run in the same process, one after the other.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import database  # noqa: E402
import mAP  # noqa: E402
from net import pick_device  # noqa: E402
from stage import print_args, write_json  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("bench/search.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size by this (default: %(default)s)")
    parser.add_argument("--baseline-queries", type=int, default=100,
                        help="queries the original's method is timed on (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, ours and faiss's (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="mAP.py's device (default: %(default)s)")
    parser.add_argument("--result", default=str(REPO / "result"), help="where bench_search.json goes (default: %(default)s)")
    parser.add_argument("--skip-faiss", action="store_true", help="leave out the faiss comparison")
    return parser


def class_codes(rng, count, bits, classes, prototypes=4, flips=1.5):
    """(0/1 codes uint8 [count, bits], labels): a prototype of the item's class with about `flips` bits flipped.

    Few distinct codes near each prototype: distances are small integers with many ties, as trained codes are.
    """
    centres = rng.integers(0, 2, size=(classes, prototypes, bits), dtype=np.uint8)
    labels = rng.integers(0, classes, size=count)
    codes = centres[labels, rng.integers(0, prototypes, size=count)]
    codes ^= (rng.random((count, bits), dtype=np.float32) < flips / bits).astype(np.uint8)
    return codes, labels


def original_map(query_bits, query_labels, db_bits, db_labels, depth=1000):
    """The original repo's method, one query at a time: (mAP over the full ranking, mAP@depth)."""
    ap_all, ap_depth = [], []
    ranks = np.arange(1, len(db_bits) + 1)
    for code, label in zip(query_bits, query_labels):
        hamming = np.count_nonzero(code != db_bits, axis=1)
        order = np.argsort(hamming)
        relevant = db_labels[order] == label
        precision = np.cumsum(relevant) / ranks
        ap_all.append(np.sum(precision * relevant) / max(1, relevant.sum()))
        ap_depth.append(np.sum(precision[:depth] * relevant[:depth]) / max(1, relevant[:depth].sum()))
    return np.mean(ap_all), np.mean(ap_depth)


def rule_done_slowly(query_bits, query_labels, db_bits, db_labels):
    """AP per query by a stable argsort of the shuffled database: the ranking rule, as a check."""
    perm = np.random.default_rng(0).permutation(len(db_bits))
    shuffled_bits, shuffled_labels = db_bits[perm], db_labels[perm]
    out = []
    for code, label in zip(query_bits, query_labels):
        order = np.argsort(np.count_nonzero(code != shuffled_bits, axis=1), kind="stable")
        relevant = shuffled_labels[order] == label
        hits = np.flatnonzero(relevant)
        out.append(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / max(1, len(hits)))
    return np.array(out)


def write_database(folder, db, query, bits):
    """The codes written by database.py's writer, without feature files (mAP.py without --rerank reads none)."""
    parts = {part: (np.packbits(codes, axis=1), labels, None, [f"{part}/{i}.png" for i in range(len(codes))])
             for part, (codes, labels) in (("db", db), ("query", query))}
    database.write_database(folder, parts, {"format": database.FORMAT, "bits": bits, "model": None,
                                            "model_sha256": None,
                                            "labels": [str(i) for i in range(int(db[1].max()) + 1)]})


def bench_map(args, device, rng):
    bits, num_db, num_query = 48, int(200_000 * args.scale), int(10_000 * args.scale)
    db_bits, db_labels = class_codes(rng, num_db, bits, classes=10)
    query_bits, query_labels = class_codes(rng, num_query, bits, classes=10)
    db_codes, query_codes = np.packbits(db_bits, axis=1), np.packbits(query_bits, axis=1)
    sample = min(args.baseline_queries, num_query)
    db_int, query_int = db_bits.astype(np.int32), query_bits.astype(np.int32)  # the original's 0/1 int32 codes
    tic = time.perf_counter()
    original_map(query_int[:sample], query_labels[:sample], db_int, db_labels)
    baseline = (time.perf_counter() - tic) / sample * num_query
    items = mAP.prepare_items(db_codes, bits, db_labels, device=device, threads=args.threads)
    if device.type == "cuda":  # the first call pays for CUDA's start
        mAP.evaluate(items, query_codes[:8], query_labels[:8], 1000)
        torch.cuda.synchronize()
    tic = time.perf_counter()
    metrics = mAP.evaluate(items, query_codes, query_labels, 1000)
    ours = time.perf_counter() - tic
    checked = min(20, num_query)
    slow = rule_done_slowly(query_int[:checked], query_labels[:checked], db_int, db_labels)
    agrees = bool(np.allclose(metrics["per_query"]["ap_all"][:checked], slow, rtol=1e-12, atol=0))
    with tempfile.TemporaryDirectory() as scratch:
        write_database(Path(scratch) / "database", (db_bits, db_labels), (query_bits, query_labels), bits)
        tic = time.perf_counter()
        run = subprocess.run([sys.executable, str(REPO / "mAP.py"), "--bits", str(bits), "--database",
                              str(Path(scratch) / "database"), "--result", str(Path(scratch) / "result"), "--device",
                              device.type, "--threads", str(args.threads)], capture_output=True, text=True, cwd=REPO)
        script_seconds = time.perf_counter() - tic
        if run.returncode != 0:
            raise SystemExit(f"mAP.py failed:\n{run.stderr[-2000:]}")
        script_result = json.loads((Path(scratch) / "result" / f"map_{bits}bits.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
    return {
        "queries": num_query, "database": num_db, "bits": bits, "baseline_queries_timed": sample,
        "baseline_seconds_scaled": round(baseline, 3), "ours_seconds": round(ours, 3),
        "speedup": round(baseline / ours, 2), "ours_ms_per_query": round(1000 * ours / num_query, 4),
        "baseline_ms_per_query": round(1000 * baseline / num_query, 4), "map_all": metrics["map_all"],
        "map_1000": metrics["map_topk"], "agrees_with_stable_argsort": agrees,
        "script_seconds": round(script_seconds, 3), "script_peak_rss_mb": round(peak_mb, 1),
        "script_map_all_equal": script_result["map_all"] == metrics["map_all"],
        "distinct_db_codes": int(len(np.unique(db_codes, axis=0))),
    }


def bench_topk(args, device, rng):
    bits, num_db, num_query, k = 64, int(1_000_000 * args.scale), int(1_000 * args.scale), 100
    db_bits, _ = class_codes(rng, num_db, bits, classes=100, prototypes=8, flips=3)
    query_bits, _ = class_codes(rng, num_query, bits, classes=100, prototypes=8, flips=3)
    db_codes, query_codes = np.packbits(db_bits, axis=1), np.packbits(query_bits, axis=1)
    items = mAP.prepare_items(db_codes, bits, ties="index", device=device, threads=args.threads)
    mAP.topk(items, query_codes[:4], k)  # warm: GPU start, first-touch pages
    tic = time.perf_counter()
    rows, distances = mAP.topk(items, query_codes, k)
    ours = time.perf_counter() - tic
    out = {"queries": num_query, "database": num_db, "bits": bits, "k": k, "ours_seconds": round(ours, 3),
           "ours_ms_per_query": round(1000 * ours / num_query, 4)}
    if args.skip_faiss:
        return out
    try:
        import faiss
    except ImportError:
        print("faiss is not installed (pip install faiss-cpu): top-k is timed without the comparison", flush=True)
        out["faiss"] = None
        return out
    faiss.omp_set_num_threads(args.threads)
    index = faiss.IndexBinaryFlat(bits)
    index.add(db_codes)
    index.search(query_codes[:4], k)
    tic = time.perf_counter()
    faiss_distances, faiss_rows = index.search(query_codes, k)
    theirs = time.perf_counter() - tic
    out.update({"faiss_version": faiss.__version__, "faiss_seconds": round(theirs, 3),
                "faiss_ms_per_query": round(1000 * theirs / num_query, 4), "speedup_vs_faiss": round(theirs / ours, 3),
                "same_distances": bool(np.array_equal(faiss_distances, distances)),
                "same_items": bool(np.array_equal(faiss_rows, rows))})
    return out


def machine(device):
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "numpy": np.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    device = pick_device(args.device)
    rng = np.random.default_rng(0)
    result = {"machine": machine(device), "threads": args.threads, "device": str(device), "args": vars(args)}
    result["map"] = bench_map(args, device, rng)
    result["topk"] = bench_topk(args, device, rng)
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(args.result) / "bench_search.json"
    write_json(path, result)
    m, t = result["map"], result["topk"]
    rows = [("benchmark", "ours", "baseline", "ratio"),
            (f"mAP.py evaluation, {m['queries']:,} x {m['database']:,} 48-bit codes (s)", f"{m['ours_seconds']:.2f}",
             f"{m['baseline_seconds_scaled']:.2f}", f"{m['speedup']:.1f}x"),
            (f"  ms per query (the original timed on {m['baseline_queries_timed']} queries, scaled)",
             f"{m['ours_ms_per_query']:.3f}", f"{m['baseline_ms_per_query']:.3f}", ""),
            ("  mAP.py as a script: seconds, peak RSS (MB)", f"{m['script_seconds']:.2f}", f"{m['script_peak_rss_mb']:.0f}", ""),
            ("  AP equals a stable argsort of the shuffled database", str(m["agrees_with_stable_argsort"]), "", "")]
    title = f"top-{t['k']}, {t['queries']:,} x {t['database']:,} 64-bit codes"
    if t.get("faiss_seconds") is not None:
        rows += [(f"{title}, vs faiss IndexBinaryFlat (s)", f"{t['ours_seconds']:.2f}", f"{t['faiss_seconds']:.2f}",
                  f"{t['speedup_vs_faiss']:.2f}x"),
                 ("  same distances / same items as faiss", str(t["same_distances"]), str(t["same_items"]), "")]
    else:
        rows.append((f"{title} (s); faiss absent", f"{t['ours_seconds']:.2f}", "", ""))
    print()
    for name, ours, baseline, ratio in rows:
        print(f"{name:<62}{ours:>10}{baseline:>12}{ratio:>8}")
    print(f"threads {args.threads}, device {device}, load average {result['machine']['load_average']} -> "
          f"{result['machine']['load_average_after']}; wrote {path}")


if __name__ == "__main__":
    main()
