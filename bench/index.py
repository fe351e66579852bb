"""Search backends at scale: the exact scan, faiss flat, faiss IVF and Milvus on generated 64-bit codes.

    python bench/index.py                              # 1M codes: scan, faiss flat, faiss IVF, Milvus
    python bench/index.py --sizes 1000000 10000000 --skip-milvus-above 1000000
    python bench/index.py --rerank-items 1000000       # also coarse-to-fine with 4096-d fp16 features on disk

For each size N: N codes with class structure (1,000 classes x 4 prototypes, about 1.5 bits flipped: many ties, as
trained codes have) and --queries queries drawn the same way. Each backend runs in a child process of its own, so
its peak memory (RSS, VmHWM) is its own: the scan (mAP.topk, as query.py scans), faiss IndexBinaryFlat and
IndexBinaryIVF (nlist and nprobe as index.py picks them: about 4 sqrt(N) lists, nprobe doubled until the recall
reaches 0.99) and a Milvus collection (BIN_FLAT and BIN_IVF_FLAT) in the embedded server of the `milvus` package.
Measured: build seconds, top-10 and radius-2 queries per second, recall against the scan (top 10: share of the
results no farther than the exact 10th distance; radius 2: items found within 2 over the items within 2), peak RSS.

--rerank-items N writes N x 4096 fp16 features (sparse, fc7-like: 3/4 zeros) to a memory-mapped file under
--tmp, retrieves --rerank-queries queries coarse to fine (radius 2, top 10) through the scan and through the faiss
index, checks the two agree, and deletes the file. Writes result/bench_index.json and prints a table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stage import print_args, write_json  # noqa: E402

BITS, TOPK, RADIUS = 64, 10, 2


def get_args_parser():
    parser = argparse.ArgumentParser("bench/index.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000000], help="database sizes (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per size (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for faiss and the scan; 1 on a loaded machine (default: %(default)s)")
    parser.add_argument("--backends", nargs="+", default=["scan", "faiss flat", "faiss ivf", "milvus flat", "milvus ivf"],
                        help="which to run; the scan always runs first, as the reference (default: all)")
    parser.add_argument("--skip-milvus-above", type=int, default=1000000,
                        help="Milvus only up to this size (default: %(default)s)")
    parser.add_argument("--rerank-items", type=int, default=0, help="fp16 feature rows for coarse-to-fine (default: none)")
    parser.add_argument("--rerank-queries", type=int, default=100, help="queries for coarse-to-fine (default: %(default)s)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the feature file goes (default: %(default)s)")
    parser.add_argument("--result", default=str(REPO / "result"), help="where bench_index.json goes (default: %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a child process: one backend, one size
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    return parser


def class_codes(count, seed, classes=1000, prototypes=4, flips=1.5, chunk=1 << 16):
    """Packed 64-bit codes uint8 [count, 8]: a prototype of a random class with about `flips` bits flipped."""
    centres = np.random.default_rng(12345).integers(0, 2, size=(classes * prototypes, BITS), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    out = np.empty((count, BITS // 8), dtype=np.uint8)
    for start in range(0, count, chunk):  # unpacked bits only a chunk at a time
        stop = min(count, start + chunk)
        codes = centres[rng.integers(0, len(centres), size=stop - start)]
        codes ^= (rng.random((stop - start, BITS), dtype=np.float32) < flips / BITS).astype(np.uint8)
        out[start:stop] = np.packbits(codes, axis=1)
    return out


def peak_rss_mb(pid="self"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(work):
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------------
# Workers: one backend at one size, in a child process


def scan_worker(codes, queries, args):
    import mAP

    items, build = timed(lambda: mAP.prepare_items(codes, BITS, ties="index", threads=args.threads))
    (_, distances), top_seconds = timed(lambda: mAP.topk(items, queries, TOPK))

    def within():
        counts = []
        for start in range(0, len(queries), 16):
            for row in mAP.hamming_distances(items, queries[start:start + 16]):
                counts.append(len(np.flatnonzero(row <= RADIUS)))
        return np.array(counts)

    counts, radius_seconds = timed(within)
    np.savez(args.reference, kth=distances[:, TOPK - 1].astype(np.int64), counts=counts)
    return {"build_s": build, "topk_s": top_seconds, "radius_s": radius_seconds, "recall_topk": 1.0,
            "recall_radius": 1.0}


def engine_figures(engine, queries, reference):
    (distances, _), top_seconds = timed(lambda: engine.knn(queries, TOPK))
    found, radius_seconds = timed(lambda: engine.within(queries, RADIUS))
    kth, counts = reference["kth"], reference["counts"]
    return {"topk_s": top_seconds, "radius_s": radius_seconds,
            "recall_topk": float(np.mean(np.sum(distances <= kth[:, None], axis=1) / TOPK)),
            "recall_radius": sum(len(rows) for rows, _ in found) / max(1, int(counts.sum())),
            "capped_queries": int(sum(len(rows) >= 16384 for rows, _ in found))}


def tuned_nprobe(engine, queries, reference, nlist):
    """index.py's rule: nprobe doubles from nlist / 64 until both recalls reach 0.99 (on the first 200 queries)."""
    sample = {name: value[:200] for name, value in reference.items()}
    nprobe = max(1, nlist // 64)
    while True:
        engine.set_nprobe(nprobe)
        figures = engine_figures(engine, queries[:200], sample)
        if min(figures["recall_topk"], figures["recall_radius"]) >= 0.99 or nprobe >= nlist:
            return nprobe
        nprobe = min(nlist, nprobe * 2)


def faiss_worker(codes, queries, args, kind):
    import faiss
    import index

    faiss.omp_set_num_threads(args.threads)
    nlist = index.auto_nlist(len(codes)) if kind == "ivf" else None
    built, build = timed(lambda: index.build_faiss(codes, kind, nlist))
    engine = index.FaissIndex(built, args.threads)
    engine._threads = lambda count: None  # the bench's --threads throughout
    reference = dict(np.load(args.reference))
    nprobe = tuned_nprobe(engine, queries, reference, nlist) if kind == "ivf" else None
    return {"build_s": build, "nlist": nlist, "nprobe": nprobe, **engine_figures(engine, queries, reference)}


def milvus_worker(codes, queries, args, kind):
    import index
    from milvus import default_server

    folder = tempfile.mkdtemp(prefix="bench_milvus.", dir=args.tmp)
    default_server.set_base_dir(folder)
    default_server.start()
    try:
        client = index.milvus_client(f"http://127.0.0.1:{default_server.listen_port}")
        labels = np.zeros(len(codes), dtype=np.int64)
        nlist = index.auto_nlist(len(codes)) if kind == "ivf" else None
        _, build = timed(lambda: index.load_milvus(client, f"bench_{kind}", codes, labels, kind, nlist))
        engine = index.MilvusIndex(client, f"bench_{kind}")
        reference = dict(np.load(args.reference))
        nprobe = tuned_nprobe(engine, queries, reference, nlist) if kind == "ivf" else None
        figures = engine_figures(engine, queries, reference)
        server_mb = peak_rss_mb(default_server.server_proc.pid)
    finally:
        default_server.stop()
        subprocess.run(["rm", "-rf", folder], check=False)
    return {"build_s": build, "nlist": nlist, "nprobe": nprobe, "server_peak_rss_mb": server_mb, **figures}


def run_worker(args):
    codes, queries = class_codes(args.size, seed=1), class_codes(args.queries, seed=2)
    base_mb = peak_rss_mb()
    name = args.worker
    if name == "scan":
        figures = scan_worker(codes, queries, args)
    elif name.startswith("faiss"):
        figures = faiss_worker(codes, queries, args, name.split()[1])
    else:
        figures = milvus_worker(codes, queries, args, name.split()[1])
    figures.update(peak_rss_mb=peak_rss_mb(), codes_rss_mb=base_mb)
    print(json.dumps(figures))


# ---------------------------------------------------------------------------------------------------------------
# Coarse-to-fine with features on disk


def write_features(path, count, dim=4096, chunk=16384):
    """fc7-like fp16 rows (ReLU outputs, three quarters zeros), memory-mapped: a random block of `chunk` rows,
    rolled by a different shift for each chunk (drawing 8 GB of normals took longer than writing them)."""
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, dim))
    rng = np.random.default_rng(3)
    block = np.maximum(rng.standard_normal((chunk, dim), dtype=np.float32) - 0.67, 0).astype(np.float16)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        features[start:stop] = np.roll(block, start // chunk + 1, axis=1)[:stop - start]
    features.flush()
    del features


def rerank_worker(args):
    import faiss
    import index
    import mAP

    faiss.omp_set_num_threads(1)
    codes, queries = class_codes(args.size, seed=1), class_codes(args.rerank_queries, seed=2)
    features = np.load(args.reference, mmap_mode="r")
    query_features = np.ascontiguousarray(features[:len(queries)])  # any rows: distances are what is timed
    items = mAP.prepare_items(codes, BITS, features=features, threads=args.threads)
    engine = index.FaissIndex(index.build_faiss(codes, "flat", None), 1)
    through_index, index_seconds = timed(lambda: index.coarse_to_fine(engine, items, queries, query_features,
                                                                      RADIUS, TOPK))
    scanned, scan_seconds = timed(lambda: mAP.coarse_to_fine(items, queries, query_features, RADIUS, TOPK))
    same = all(np.array_equal(a["rows"], b["rows"]) for a, b in zip(through_index, scanned))
    print(json.dumps({"items": args.size, "queries": len(queries), "index_s": index_seconds, "scan_s": scan_seconds,
                      "same_results": same, "mean_candidates": float(np.mean([f["candidates"] for f in scanned])),
                      "file_gb": os.path.getsize(args.reference) / 1e9, "peak_rss_mb": peak_rss_mb()}))


# ---------------------------------------------------------------------------------------------------------------


def child(args, worker, size, reference):
    command = [sys.executable, __file__, "--worker", worker, "--size", str(size), "--reference", str(reference),
               "--queries", str(args.queries), "--threads", str(args.threads), "--tmp", args.tmp,
               "--rerank-queries", str(args.rerank_queries)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{worker} at {size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"failed": done.stderr[-500:]}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {worker:<12} {size:>10,}: {json.dumps(figures)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return figures


def print_table(results, queries):
    print(f"\n{'backend':<14}{'N':>11}{'build s':>9}{'top-10 QPS':>12}{'radius-2 QPS':>14}{'recall@10':>11}"
          f"{'recall r2':>11}{'peak RSS MB':>13}")
    for size, rows in results.items():
        for name, f in rows.items():
            if "failed" in f:
                print(f"{name:<14}{size:>11,}  failed")
                continue
            print(f"{name:<14}{size:>11,}{f['build_s']:>9.1f}{queries / f['topk_s']:>12.0f}{queries / f['radius_s']:>14.0f}"
                  f"{f['recall_topk']:>11.4f}{f['recall_radius']:>11.4f}{f['peak_rss_mb']:>13.0f}")


def main():
    args = get_args_parser().parse_args()
    if args.worker == "rerank":
        return rerank_worker(args)
    if args.worker:
        return run_worker(args)
    print_args(args)
    report = {"args": vars(args), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_before": os.getloadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as scratch:
        reference = Path(scratch) / "reference.npz"
        for size in args.sizes:
            workers = ["scan"] + [name for name in args.backends if name != "scan"
                                  and (size <= args.skip_milvus_above or not name.startswith("milvus"))]
            report["sizes"][size] = {worker: child(args, worker, size, reference) for worker in workers}
        if args.rerank_items:
            features = Path(scratch) / "features.npy"
            _, seconds = timed(lambda: write_features(features, args.rerank_items))
            report["rerank"] = {**child(args, "rerank", args.rerank_items, features), "write_s": seconds}
            features.unlink()
    report["load_after"] = os.getloadavg()
    print_table(report["sizes"], args.queries)
    write_json(Path(args.result) / "bench_index.json", report)


if __name__ == "__main__":
    main()
