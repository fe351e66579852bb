"""The search index over the database codes: a faiss binary index file, or a Milvus collection.

    python index.py --bits 48                                  # exact faiss index: database/index.faiss
    python index.py --bits 48 --kind ivf                       # inverted lists, nlist ~ 4 sqrt(N), nprobe tuned
    python index.py --bits 48 --kind ivf --nlist 1024 --nprobe 32
    python index.py --bits 48 --backend milvus --uri http://localhost:19530 --collection dlbhc_48bits [--kind ivf]

Then query.py and demo.py ask the index for their candidates (--backend exact|faiss|milvus; by default the faiss
index when it is built and fresh, else the exact scan). They never build one themselves.

The record. meta.json gets an `index` entry per backend ("faiss", "milvus") with the kind, nlist, nprobe, the uri
and collection (Milvus), the sha256 of db_binary.npy it was built from, and the self-check. An index whose codes
changed since (checksum differs) is refused, as stale codes are; database.py writes a new folder, which drops both.

The self-check. On a sample of the queries (--check-queries), the index is compared with the exact scan: recall of
the top k (the share of its k results no farther than the exact k-th distance) and of radius r (items found within
r over the items within r). With --kind ivf and no --nprobe, nprobe doubles from nlist/64 until both reach 0.99.

How candidates come out. faiss and Milvus return equal distances in arbitrary order, so they are asked only for the
candidate set: the k-th distance (a top-k search), then every item within r' = max(r, that distance) (a range
search). mAP.py's rule orders them, so the exact backends (faiss flat, Milvus BIN_FLAT) give the scan's results,
item for item. Milvus returns at most 16,384 items per search: more candidates than that are refused.
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

import database
import mAP
from stage import (UserError, atomic_write, common_args_parser, elapsed, non_negative_int, positive_int, print_args,
                   run_main, sha256_file, threads_int, write_json)

INDEX_FILE = "index.faiss"
BACKENDS = ("exact", "faiss", "milvus")
KINDS = ("flat", "ivf")
MILVUS_CAP = 16384  # Milvus's largest limit per search: a range search returns at most this many items
MILVUS_TIMEOUT = 5  # seconds to reach a Milvus server before saying it is unreachable
TARGET_RECALL = 0.99
QUERY_BATCH = 256  # queries per engine call: bounds the range-search results held at once


# ---------------------------------------------------------------------------------------------------------------
# Engines: each answers top-k distances and range searches with file rows and Hamming distances


class FaissIndex:
    """A faiss binary index (IndexBinaryFlat or IndexBinaryIVF) over the database rows."""

    def __init__(self, index, threads=1):
        self.index, self.threads = index, max(1, threads)

    def _threads(self, num_queries):
        # a parallel region waits for its slowest thread: on a loaded machine a lone query ran 50x slower on 2
        faiss.omp_set_num_threads(max(1, min(self.threads, num_queries // 32)))

    def knn(self, query_codes, k):
        """(Hamming distances int64 [q, k] ascending, file rows int64 [q, k]); row -1 where fewer were found."""
        self._threads(len(query_codes))
        distances, rows = self.index.search(np.ascontiguousarray(query_codes), k)
        return distances.astype(np.int64), rows.astype(np.int64)

    def within(self, query_codes, radius):
        """[(file rows, Hamming distances)] of the items within `radius` (inclusive), one pair per query."""
        self._threads(len(query_codes))
        limits, distances, rows = self.index.range_search(np.ascontiguousarray(query_codes), int(radius) + 1)
        return [(rows[a:b].astype(np.int64), distances[a:b].astype(np.int64)) for a, b in zip(limits[:-1], limits[1:])]

    def set_nprobe(self, nprobe):
        if nprobe:
            self.index.nprobe = int(nprobe)


class MilvusIndex:
    """A Milvus collection: id = database row, label, code (BINARY_VECTOR), HAMMING metric."""

    def __init__(self, client, collection, nprobe=None):
        self.client, self.collection, self.nprobe = client, collection, nprobe

    def _search(self, query_codes, limit, params):
        params = {**params, **({"nprobe": int(self.nprobe)} if self.nprobe else {})}
        found = []
        for start in range(0, len(query_codes), 64):  # 64 queries x 16,384 hits stay well within a gRPC message
            batch = [bytes(code) for code in query_codes[start:start + 64]]
            found += self.client.search(self.collection, data=batch, limit=limit, anns_field="code",
                                        search_params={"metric_type": "HAMMING", "params": params},
                                        consistency_level="Strong")
        return found

    def knn(self, query_codes, k):
        distances = np.full((len(query_codes), k), np.iinfo(np.int32).max, dtype=np.int64)
        rows = np.full((len(query_codes), k), -1, dtype=np.int64)
        for i, hits in enumerate(self._search(query_codes, k, {})):
            distances[i, :len(hits)] = [round(hit["distance"]) for hit in hits]
            rows[i, :len(hits)] = [hit["id"] for hit in hits]
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(rows, order, 1)

    def within(self, query_codes, radius):
        """Top-k searches whose limit grows (x4, up to 16,384) until the last hit lies beyond the radius.

        Not Milvus's range search (radius, range_filter): on a built BIN_IVF_FLAT index, Milvus 2.3.5 returned no
        item at all for most queries, at any radius (seen here); top-k searches were right on every index.
        """
        found, pending, limit = [None] * len(query_codes), np.arange(len(query_codes)), 256
        while len(pending):
            distances, rows = self.knn(query_codes[pending], limit)
            grow = (distances[:, -1] <= radius) & (limit < MILVUS_CAP)  # maybe more within the radius
            for i, row_distances, row_rows in zip(pending[~grow], distances[~grow], rows[~grow]):
                keep = row_distances <= radius
                found[i] = (row_rows[keep], row_distances[keep])
            pending, limit = pending[grow], min(MILVUS_CAP, limit * 4)
        return found

    def set_nprobe(self, nprobe):
        self.nprobe = nprobe


def milvus_client(uri, token=""):
    """A MilvusClient for uri, or one line naming the uri (or the pip command) and exit 2."""
    try:
        from pymilvus import MilvusClient, MilvusException
    except ImportError:
        raise UserError("--backend milvus needs the Milvus client: pip install pymilvus") from None
    for name in ("pymilvus", "pymilvus.milvus_client"):  # their own error log would be a second line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=MILVUS_TIMEOUT)
    except MilvusException:
        raise UserError(f"cannot reach Milvus at {uri} within {MILVUS_TIMEOUT} s; start the server there or give "
                        "the right --uri") from None


# ---------------------------------------------------------------------------------------------------------------
# Candidates and coarse-to-fine retrieval through an index


def exact_candidates(engine, query_codes, radius, topk, num_items, bits):
    """Per query (file rows, Hamming distances, r'): every item the engine finds within r', the smallest radius
    >= `radius` holding at least min(topk, N) items (the k-th distance of a top-k search), in no useful order."""
    k = min(topk, num_items)
    out = []
    for start in range(0, len(query_codes), QUERY_BATCH):
        batch = query_codes[start:start + QUERY_BATCH]
        kth = engine.knn(batch, k)[0][:, k - 1]
        used = np.maximum(radius, np.minimum(kth, bits))  # an IVF may find fewer than k: then all within bits
        found = [None] * len(batch)
        for value in np.unique(used):  # a range search takes one radius for all its queries
            picked = np.flatnonzero(used == value)
            for i, (rows, distances) in zip(picked, engine.within(batch[picked], value)):
                if isinstance(engine, MilvusIndex) and len(rows) >= MILVUS_CAP:
                    raise UserError(f"a query has more than {MILVUS_CAP} candidates within radius {value}, more than "
                                    "Milvus returns; give a smaller --radius or --topk, or use --backend faiss")
                found[i] = (rows, distances, int(value))
        out += found
    return out


def coarse_to_fine(engine, items, query_codes, query_features, radius, topk):
    """mAP.coarse_to_fine's results, with the candidates from an index: one dict per query (rows, hamming,
    euclidean, radius, candidates). Only the candidates' fc7 rows are read."""
    position_of = np.empty(items.size, dtype=np.int64)
    position_of[items.rows] = np.arange(items.size)  # tie order: the scan's candidates come in this order
    layout = mAP.key_layout(items.bits, items.size, euclidean=True, relevant=False)
    results = []
    found = exact_candidates(engine, query_codes, radius, topk, items.size, items.bits)
    with mAP.torch_threads(1):
        for i, (rows, distances, used) in enumerate(found):
            positions = position_of[rows]
            order = np.argsort(positions)
            rows, distances, positions = rows[order], distances[order], positions[order]
            best, euclidean = mAP.rank_by_fc7(query_features[i:i + 1], items.features, rows, positions, topk,
                                              layout)
            results.append({"rows": rows[best], "hamming": distances[best], "euclidean": euclidean,
                            "radius": used, "candidates": len(rows)})
    return results


# ---------------------------------------------------------------------------------------------------------------
# Building and checking


def auto_nlist(num_items):
    """About 4 sqrt(N) lists, and no more than N / 39: faiss's k-means wants 39 points per centroid."""
    return max(1, min(round(4 * math.sqrt(num_items)), num_items // 39))


def build_faiss(codes, kind, nlist):
    dim = codes.shape[1] * 8  # padding bits are 0 in every code: they never differ
    if kind == "flat":
        index = faiss.IndexBinaryFlat(dim)
    else:
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, nlist)
        index.cp.max_points_per_centroid = 32  # k-means on 32 codes a list, not 256: 8x less training time
        index.train(codes)
    index.add(codes)
    return index


def exact_reference(codes, bits, sample, topk, radius):
    """(k-th distance [q], items within radius [q]) of each sample query by the exact scan."""
    items = mAP.prepare_items(codes, bits, ties="index")
    kth, counts = np.empty(len(sample), np.int64), np.empty(len(sample), np.int64)
    for start in range(0, len(sample), 16):  # [16, N] distances at a time
        distances = mAP.hamming_distances(items, sample[start:start + 16])
        kth[start:start + 16] = np.partition(distances, topk - 1, axis=1)[:, topk - 1]
        counts[start:start + 16] = np.count_nonzero(distances <= radius, axis=1)
    return kth, counts


def measure_recall(engine, sample, reference, topk, radius):
    """Recall of the top k and of radius r against the exact reference, with each search's seconds."""
    kth, counts = reference
    started = time.perf_counter()
    distances = engine.knn(sample, topk)[0]
    topk_seconds = elapsed(started)
    started = time.perf_counter()
    found = sum(len(rows) for rows, _ in engine.within(sample, radius))
    radius_seconds = elapsed(started)
    return {"recall_topk": round(float(np.mean(np.sum(distances <= kth[:, None], axis=1) / topk)), 4),
            "recall_radius": round(found / max(1, int(counts.sum())), 4),
            "seconds_topk": topk_seconds, "seconds_radius": radius_seconds}


def self_check(engine, codes, bits, sample, args, nlist):
    """Measure recall on the sample; with an IVF and no --nprobe, the smallest nprobe (doubling) reaching 0.99."""
    topk, radius = min(args.check_topk, len(codes)), args.check_radius
    started = time.perf_counter()
    reference = exact_reference(codes, bits, sample, topk, radius)
    check = {"queries": len(sample), "topk": topk, "radius": radius, "seconds_exact": elapsed(started)}
    if args.kind == "flat" or args.nprobe:
        engine.set_nprobe(args.nprobe)
        return {**check, "nprobe": args.nprobe, **measure_recall(engine, sample, reference, topk, radius)}
    nprobe = max(1, nlist // 64)
    while True:
        engine.set_nprobe(nprobe)
        measured = measure_recall(engine, sample, reference, topk, radius)
        print(f"self-check nprobe {nprobe}: recall@{topk} {measured['recall_topk']}, "
              f"recall within {radius} {measured['recall_radius']}")
        if min(measured["recall_topk"], measured["recall_radius"]) >= TARGET_RECALL or nprobe >= nlist:
            return {**check, "nprobe": nprobe, **measured}
        nprobe = min(nlist, nprobe * 2)


def check_sample(db_codes, query_codes, count):
    """Up to `count` self-check queries: the database's queries, else database items (a fixed random sample)."""
    pool = query_codes if len(query_codes) else db_codes
    pick = np.sort(np.random.default_rng(0).permutation(len(pool))[:count])
    return np.ascontiguousarray(pool[pick])


# ---------------------------------------------------------------------------------------------------------------
# Milvus collections


def load_milvus(client, name, codes, labels, kind, nlist):
    """Create the collection (id = row, label, code) and its index, insert every row, flush and load it."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("label", DataType.INT64)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=codes.shape[1] * 8)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="code", index_type="BIN_FLAT" if kind == "flat" else "BIN_IVF_FLAT",
                           metric_type="HAMMING", params={} if kind == "flat" else {"nlist": int(nlist)})
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")
    if labels.ndim == 2:  # multi-hot labels: the scalar field holds none (-1)
        labels = np.full(len(codes), -1, dtype=np.int64)
    for start in range(0, len(codes), 20000):
        client.insert(name, [{"id": start + i, "label": int(label), "code": bytes(code)}
                             for i, (code, label) in enumerate(zip(codes[start:start + 20000],
                                                                   labels[start:start + 20000]))])
    client.flush(name)
    # searched before its index is built, a sealed segment gave empty range searches: wait, then load it afresh
    index_name = client.list_indexes(name)[0]
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        state = client.describe_index(name, index_name)
        if state.get("pending_index_rows", 0) == 0 and state.get("indexed_rows", 0) >= len(codes):
            break
        time.sleep(0.5)
    client.release_collection(name)
    client.load_collection(name)


def replace_collection(client, args, meta):
    """Drop the collection when this database built it (recorded in meta.json); refuse any other one."""
    if not client.has_collection(args.collection):
        return
    recorded = meta.get("index", {}).get("milvus", {})
    if recorded.get("collection") == args.collection and recorded.get("uri") == args.uri:
        client.drop_collection(args.collection)
        return
    raise UserError(f"Milvus at {args.uri} already holds a collection {args.collection!r} that {args.database} did "
                    "not build; give another --collection, or drop that one")


# ---------------------------------------------------------------------------------------------------------------
# Opening an index for query.py and demo.py


def add_backend_args(parser):
    """query.py and demo.py: --backend, --uri, --token."""
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="where candidates come from (default: the faiss index when index.py built it and it is "
                             "fresh, else exact; milvus when --uri is given)")
    parser.add_argument("--uri", default=None, help="Milvus server (default: the one index.py recorded)")
    parser.add_argument("--token", default="", help="Milvus token, user:password (default: none)")


def stale_reason(folder, record):
    """Why a recorded index cannot serve this database, or None when it is fresh."""
    if record.get("codes_sha256") != sha256_file(Path(folder) / "db_binary.npy"):
        return "was built from other codes than db_binary.npy holds now (checksum differs)"
    return None


def rebuild_command(args, backend, record):
    command = f"python index.py --bits {args.bits} --database {args.database} --kind {record.get('kind', 'flat')}"
    if backend == "milvus":
        command += f" --backend milvus --uri {record.get('uri')} --collection {record.get('collection')}"
    return command


def open_faiss(args, record, num_items):
    path = Path(args.database) / INDEX_FILE
    reason = stale_reason(args.database, record) if path.is_file() else "is missing"
    if reason:
        raise UserError(f"the faiss index {path} {reason}; rebuild it with: {rebuild_command(args, 'faiss', record)}")
    try:
        index = faiss.read_index_binary(str(path))
    except RuntimeError as err:
        raise UserError(f"{path} is corrupt ({str(err).splitlines()[0][:80]}); rebuild it with: "
                        f"{rebuild_command(args, 'faiss', record)}") from None
    if index.ntotal != num_items:
        raise UserError(f"{path} holds {index.ntotal} items, the database {num_items}; rebuild it with: "
                        f"{rebuild_command(args, 'faiss', record)}")
    engine = FaissIndex(index, getattr(args, "threads", 1))
    engine.set_nprobe(record.get("nprobe"))
    return engine


def open_milvus(args, record, num_items):
    uri = args.uri or (record or {}).get("uri")
    client = milvus_client(uri, args.token) if uri else None  # an unreachable --uri is the first thing to say
    if not record:
        raise UserError(f"{args.database} has no Milvus collection; load one with: python index.py --bits {args.bits} "
                        f"--database {args.database} --backend milvus --uri {uri or 'URI'} --collection NAME")
    reason = stale_reason(args.database, record)
    if reason:
        raise UserError(f"the Milvus collection {record['collection']} {reason}; rebuild it with: "
                        f"{rebuild_command(args, 'milvus', record)}")
    if not client.has_collection(record["collection"]):
        raise UserError(f"Milvus at {uri} has no collection {record['collection']!r}; load it with: "
                        f"{rebuild_command(args, 'milvus', {**record, 'uri': uri})}")
    count = int(client.get_collection_stats(record["collection"])["row_count"])
    if count != num_items:
        raise UserError(f"the Milvus collection {record['collection']} holds {count} items, the database {num_items};"
                        f" rebuild it with: {rebuild_command(args, 'milvus', {**record, 'uri': uri})}")
    return MilvusIndex(client, record["collection"], record.get("nprobe"))


def open_index(args, meta, num_items):
    """(backend name, engine or None for the exact scan) for query.py and demo.py."""
    records = meta.get("index", {})
    backend = args.backend or ("milvus" if args.uri else None)
    if backend is None:
        record = records.get("faiss")
        if not record or not (Path(args.database) / INDEX_FILE).is_file():
            return "exact", None
        reason = stale_reason(args.database, record)
        if reason:
            print(f"note: the faiss index {reason}; using the exact scan (rebuild: "
                  f"{rebuild_command(args, 'faiss', record)})", file=sys.stderr)
            return "exact", None
        backend = "faiss"
    if backend == "exact":
        return "exact", None
    if backend == "faiss":
        if "faiss" not in records:
            raise UserError(f"{args.database} has no faiss index; build one with: python index.py --bits {args.bits} "
                            f"--database {args.database}")
        return f"faiss {records['faiss']['kind']}", open_faiss(args, records["faiss"], num_items)
    return f"milvus {records.get('milvus', {}).get('kind')}", open_milvus(args, records.get("milvus"), num_items)


def retrieve(engine, items, query_codes, query_features, radius, topk):
    """Coarse-to-fine results for query.py and demo.py: the exact scan (engine None) or through the index."""
    if engine is None:
        return mAP.coarse_to_fine(items, query_codes, query_features, radius, topk)
    return coarse_to_fine(engine, items, query_codes, query_features, radius, topk)


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("index.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(data_root=False, device=False)],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=positive_int, required=True, help="code length; must match the database")
    parser.add_argument("--database", default="database", help="folder written by database.py (default: %(default)s)")
    parser.add_argument("--backend", default="faiss", choices=("faiss", "milvus"),
                        help="a faiss index file in --database, or a Milvus collection (default: %(default)s)")
    parser.add_argument("--kind", default="flat", choices=KINDS,
                        help="flat: exact; ivf: inverted lists, faster, may miss items (default: %(default)s)")
    parser.add_argument("--nlist", type=positive_int, default=None, help="ivf: lists (default: about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=positive_int, default=None,
                        help="ivf: lists searched per query (default: the smallest reaching recall 0.99 in the self-check)")
    parser.add_argument("--uri", default="http://localhost:19530", help="milvus: the server (default: %(default)s)")
    parser.add_argument("--token", default="", help="milvus: token, user:password (default: none)")
    parser.add_argument("--collection", default=None, help="milvus: collection name (default: dlbhc_<bits>bits)")
    parser.add_argument("--check-queries", type=non_negative_int, default=200, help="self-check: queries (default: %(default)s)")
    parser.add_argument("--check-topk", type=positive_int, default=10, help="self-check: k of recall@k (default: %(default)s)")
    parser.add_argument("--check-radius", type=non_negative_int, default=2, help="self-check: Hamming radius (default: %(default)s)")
    parser.add_argument("--threads", type=threads_int, default=1,
                        help="faiss threads; more than 1 helps only on an idle machine (default: %(default)s)")
    return parser


def check_args(args, num_items):
    if num_items == 0:
        raise UserError(f"{args.database} holds no database item; build it with: python database.py --bits {args.bits}")
    if args.nlist is not None and not 1 <= args.nlist <= num_items:
        raise UserError(f"--nlist {args.nlist}: give between 1 and the {num_items} database items")
    if args.nprobe is not None and args.nprobe < 1:
        raise UserError(f"--nprobe {args.nprobe}: give a positive number of lists")
    if args.check_queries < 1 or args.check_topk < 1 or not 0 <= args.check_radius <= args.bits:
        raise UserError("--check-queries and --check-topk must be positive, --check-radius between 0 and --bits")
    args.collection = args.collection or f"dlbhc_{args.bits}bits"


def build(args, db, meta, sample):
    """Build the index, run the self-check; return the record for meta.json."""
    nlist = None if args.kind == "flat" else (args.nlist or auto_nlist(len(db.codes)))
    record = {"kind": args.kind, "nlist": nlist, "num_items": len(db.codes), "bits": args.bits,
              "codes_sha256": sha256_file(Path(args.database) / "db_binary.npy")}
    started = time.perf_counter()
    if args.backend == "faiss":
        faiss.omp_set_num_threads(args.threads)
        index = build_faiss(db.codes, args.kind, nlist)
        engine = FaissIndex(index, args.threads)
        record["file"] = INDEX_FILE
    else:
        client = milvus_client(args.uri, args.token)
        replace_collection(client, args, meta)
        load_milvus(client, args.collection, db.codes, db.labels, args.kind, nlist)
        engine = MilvusIndex(client, args.collection)
        record.update(uri=args.uri, collection=args.collection)
    record["seconds_build"] = elapsed(started)
    record["self_check"] = self_check(engine, db.codes, args.bits, sample, args, nlist or 1)
    record["nprobe"] = record["self_check"]["nprobe"]
    if args.backend == "faiss":
        path = Path(args.database) / INDEX_FILE
        atomic_write(path, lambda tmp: faiss.write_index_binary(index, tmp))
    return record


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    started = time.perf_counter()
    db, query, meta = database.load_database(args.database, args.bits)
    check_args(args, len(db.codes))
    sample = check_sample(db.codes, query.codes, args.check_queries)
    record = build(args, db, meta, sample)
    record.update(seconds=elapsed(started), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), args=vars(args))
    meta = database.read_meta(args.database)  # as it is now, so only our entry changes
    meta.setdefault("index", {})[args.backend] = record
    write_json(Path(args.database) / "meta.json", meta)
    check = record["self_check"]
    where = f"{Path(args.database) / INDEX_FILE}" if args.backend == "faiss" else f"{args.uri} {args.collection}"
    print(f"{args.backend} {args.kind} index of {len(db.codes)} items in {where} "
          f"(nlist {record['nlist']}, nprobe {record['nprobe']}) built in {record['seconds_build']} s; self-check on "
          f"{check['queries']} queries: recall@{check['topk']} {check['recall_topk']}, recall within radius "
          f"{check['radius']} {check['recall_radius']}; recorded in {Path(args.database) / 'meta.json'}")


if __name__ == "__main__":
    run_main(main)
