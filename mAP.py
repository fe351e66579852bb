"""Hamming ranking and the retrieval metrics: the one ranking rule every later stage imports from here.

    python mAP.py --bits 48                          # mAP over the full ranking, mAP@1000, P@k, PR within a radius
    python mAP.py --bits 48 --topk 500               # mAP@500 instead of mAP@1000 (or the protocol's k)
    python mAP.py --bits 48 --rerank                 # equal Hamming distances ordered by fc7 Euclidean distance
    python mAP.py --bits 48 --ties index             # ties in database order, to compare with other code

Reads --database (written by database.py); writes to --result:
    map_<bits>bits.json    map_all, map_topk, topk, precision_r2, recall_r2, counts, ties, model_sha256, the curves
    pr_<bits>bits.png      precision-recall over Hamming radius 0..bits
    pk_<bits>bits.png      precision@k for k = 1..min(1000, N)
(map_<bits>bits_rerank.json, pr_<bits>bits_rerank.png and pk_<bits>bits_rerank.png with --rerank).

The ranking rule. Ascending Hamming distance; items at equal distance in the order of a fixed shuffle of the
database: with perm = np.random.default_rng(0).permutation(N) over the N database items taking part, item perm[0]
comes first among its equals, then perm[1], and so on (--ties index: database order). Where fc7 re-ranks (--rerank
here, and the coarse-to-fine retrieval of search.py, query.py, demo.py), equal Euclidean distances follow the same
shuffle. Ordering ties by database position would let a class-sorted list inflate the score.

Relevance. An item is relevant to a query when they share at least one label. Labels are int64 [N], one per item
(-1 unknown), or multi-hot bool/uint8 [N, C] (an all-zero row: no label); unknown items and queries take no part.

The metrics, averaged over queries:
    AP over the full ranking = (1/R) sum_i P(i) rel(i), R = relevant items in the database; 0 when R = 0
    AP@k = (1/R_k) sum_{i<=k} P(i) rel(i), R_k = relevant items within the top k; 0 when R_k = 0
    P@k for k = 1..min(1000, N)
    within Hamming radius r: precision = relevant within r / items within r (0 when none),
    recall = relevant within r / R (0 when R = 0); r = 0..bits is the PR curve, r = 2 the headline figure.

How it is fast. The database is held in tie order (Items: item p is the p-th in that order), so p breaks ties; a
ranking is then the ascending sort of one integer key per item, [Hamming distance | (fc7 distance) | p | relevant],
unique per item, so any sort gives the same order. Distances are XOR + popcount on packed uint64 words;
queries go in chunks sized from a memory budget, across threads (numpy releases the GIL). AP needs only the ranks where the
relevant items land (the low key bit after sorting), and everything within a radius is a binary search in the
sorted keys. On CUDA the distances are the exact +-1 product, (bits - q.d) / 2, and the keys sort on the GPU; the
results are the CPU's, integer for integer.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import database
from net import pick_device
from stage import (UserError, atomic_write, common_args_parser, elapsed, memory_mb, non_negative_int, positive_int,
                   print_args, refuse_json_constant, run_main, threads_int, write_json)

TIES = ("shuffle", "index")
CURVE_DEPTH = 1000  # P@k is reported for k = 1..min(CURVE_DEPTH, N)
HEADLINE_RADIUS = 2  # precision_r2 and recall_r2: within Hamming radius 2, DLBHC's headline figure
DEFAULT_RADIUS = 2  # coarse-to-fine radius when search.py has not measured one for this model
DISTANCE_BLOCK = 65536  # items per XOR + popcount step: 512 kB of uint64 scratch, within a core's L2 cache
FC7_BLOCK = 4096  # database rows per fc7 product
RADIUS_SAMPLE = 16384  # items sorted to guess the radius that holds k items
KEY_BITS = 63  # a ranking key fits torch's int64, which is signed
EUCLID_BITS = 31  # a non-negative float32 orders like its bit pattern, and its sign bit is 0
FP16_EXACT = 2048  # every integer up to 2048 is exact in fp16: +-1 products of codes up to 2048 bits are exact
GPU_BUDGET = 2 << 30  # bytes of working tensors per chunk of queries on the GPU
GPU_BYTES_PER_ITEM = 48  # per query and item on the GPU: fp16 product, int32 distance, int64 keys, sorted keys, index


# ---------------------------------------------------------------------------------------------------------------
# The database side, prepared once


@dataclass
class Items:
    """The database items that take part, held in tie order: item p (0-based) is file row rows[p].

    A stable order by distance, or a ranking key whose low bits are p, is then exactly the ranking rule. Every
    function below takes Items and returns file rows.
    """
    bits: int
    rows: np.ndarray  # int64 [N], the file row of each item
    codes: np.ndarray  # uint8 [N, ceil(bits / 8)]
    words: np.ndarray  # uint64 [W, N]: the codes as 64-bit words for XOR + popcount
    labels: np.ndarray | None  # int64 [N] (-1 unknown), or multi-hot labels as uint64 words [W, N] (label_words)
    features: np.ndarray | None  # fc7 float16 [file rows, D], indexed by file row (a memory map), or None
    device: torch.device
    threads: int
    budget: int  # bytes of working memory for chunks of queries on the CPU
    on_gpu: bool
    gpu: dict = field(default_factory=dict)  # tensors on the GPU, made on first use

    @property
    def size(self):
        return len(self.rows)

    @property
    def dist_dtype(self):
        return np.uint8 if self.bits <= 255 else np.uint16


def prepare_items(codes, bits, labels=None, features=None, take=None, ties="shuffle", device=None, threads=None,
                  memory_mb=256):
    """Items for ranking: the rows `take` (default all) of a database split, in tie order.

    labels: int64 [N] (one label per item, -1 unknown) or multi-hot bool/uint8 [N, C] (an all-zero row: no label),
    or None where no metric is asked for. features may be a memory map; only the rows ranked are read.
    """
    take = np.arange(len(codes), dtype=np.int64) if take is None else np.asarray(take, dtype=np.int64)
    if len(take) == 0:
        raise UserError(f"the database has no item that takes part; build one with: python database.py --bits {bits}")
    rows = take[tie_order(len(take), ties)]
    item_codes = np.asarray(codes)[rows]
    if labels is not None:
        labels = np.asarray(labels)[rows]
        labels = label_words(labels) if labels.ndim == 2 else labels.astype(np.int64)
    device = device or torch.device("cpu")
    return Items(bits, rows, item_codes, code_words(item_codes), labels, features, device,
                 max(1, threads or os.cpu_count() or 1), int(memory_mb) << 20,
                 device.type == "cuda" and bits <= FP16_EXACT)


def tie_order(num_items, ties="shuffle"):
    """Item indices in tie order: order[0] comes first among items at equal distance."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if ties == "index":
        return np.arange(num_items, dtype=np.int64)
    return np.random.default_rng(0).permutation(num_items)


# ---------------------------------------------------------------------------------------------------------------
# Relevance


def labelled(labels):
    """Indices of the rows with a label (>= 0, or a multi-hot row with a 1): the ones that take part in a metric."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels.any(axis=1) if labels.ndim == 2 else labels >= 0)


def label_words(multi_hot):
    """Multi-hot bool/uint8 [n, C] -> uint64 words [W, n]: bit c of item i's words set when it has label c."""
    return code_words(np.packbits(np.asarray(multi_hot) != 0, axis=1))


def relevance(query_labels, db_labels):
    """bool [q, N]: query i and database item j share at least one label. The relevance rule of every stage.

    Labels take either form, the same on both sides: int64 [n], one label per item, -1 unknown; or multi-hot
    bool/uint8 [n, C], an all-zero row for no label. An unknown label shares nothing.
    """
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    if db_labels.ndim == 2:
        if query_labels.ndim != 2 or query_labels.shape[1] != db_labels.shape[1]:
            raise ValueError(f"multi-hot database labels [N, {db_labels.shape[1]}] need queries [q, "
                             f"{db_labels.shape[1]}], got {query_labels.shape}")
        db_labels = label_words(db_labels)
    return shares_label(query_labels, db_labels)


def shares_label(query_labels, item_labels):
    """relevance() against database labels in Items' form: int64 [N], or multi-hot as uint64 words [W, N]."""
    if query_labels.ndim == 1:
        return (query_labels[:, None] == item_labels[None, :]) & (query_labels >= 0)[:, None]
    shared = np.zeros((len(query_labels), item_labels.shape[1]), dtype=bool)
    for query_word, item_word in zip(label_words(query_labels), item_labels):
        shared |= (query_word[:, None] & item_word[None, :]) != 0
    return shared


# ---------------------------------------------------------------------------------------------------------------
# Hamming distances


def code_words(codes):
    """Packed codes uint8 [N, B] -> uint64 words [W, N], W = ceil(B / 8); padding bytes are 0 and never differ."""
    codes = np.asarray(codes, dtype=np.uint8)
    width = -(-codes.shape[1] // 8) * 8
    padded = np.zeros((len(codes), width), dtype=np.uint8)
    padded[:, :codes.shape[1]] = codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


def hamming_distances(items, query_codes):
    """Hamming distance from each query to every item in tie order: numpy [q, N] uint8 (uint16 past 255 bits).

    XOR + popcount on uint64 words, a block of items at a time so that the XOR scratch stays in the core's cache
    across the queries (1.7x faster than one pass at a million items). On CUDA: the exact +-1 product.
    """
    if items.on_gpu:
        return _gpu_distances(items, query_codes).cpu().numpy().astype(items.dist_dtype)
    query_words = code_words(query_codes)  # [W, q]
    out = np.empty((query_words.shape[1], items.size), dtype=items.dist_dtype)
    block = min(items.size, DISTANCE_BLOCK)
    scratch, counts = np.empty(block, dtype=np.uint64), np.empty(block, dtype=items.dist_dtype)
    for start in range(0, items.size, block):
        stop = min(items.size, start + block)
        xor, count = scratch[:stop - start], counts[:stop - start]
        for i in range(query_words.shape[1]):
            row = out[i, start:stop]
            for w, words in enumerate(items.words):
                np.bitwise_xor(words[start:stop], query_words[w, i], out=xor)
                np.bitwise_count(xor, out=row if w == 0 else count)
                if w:
                    row += count
    return out


def _gpu_signs(packed, bits, device):
    """Packed codes uint8 [n, B] -> +-1 fp16 [n, bits] on the device (bit 1 -> +1, bit 0 -> -1)."""
    unpacked = torch.from_numpy(np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)).to(device)
    return unpacked.to(torch.float16).mul_(2).sub_(1)


def _gpu_distances(items, query_codes):
    """int32 [q, N] on the GPU: (bits - q.d) / 2 from +-1 codes; every partial sum is an integer <= bits."""
    if "signs" not in items.gpu:
        items.gpu["signs"] = _gpu_signs(items.codes, items.bits, items.device)
        items.gpu["items"] = torch.arange(items.size, device=items.device, dtype=torch.int64)
    dots = _gpu_signs(query_codes, items.bits, items.device) @ items.gpu["signs"].T  # [q, N] fp16
    return (items.bits - dots.to(torch.int32)) // 2


def smallest_radius(distances, count, bits):
    """The smallest r with at least `count` items at Hamming distance <= r (1 <= count <= len(distances)).

    A binary search of counts (each a vectorised pass, no histogram) whose first probes are a guess from a sorted
    sample of about RADIUS_SAMPLE items and its neighbours: usually two or three passes instead of log2(bits).
    """
    step = max(1, len(distances) // RADIUS_SAMPLE)
    sample = np.sort(distances[::step], kind="stable")  # radix sort for small integer types
    guess = int(sample[min(len(sample) - 1, (count - 1) // step)])
    probes = [guess, guess - 1, guess + 1]
    low, high = 0, bits  # the answer lies in [low, high]; any probe in [low, high) keeps it there
    while low < high:
        middle = next((p for p in probes if low <= p < high), (low + high) // 2)
        if np.count_nonzero(distances <= middle) >= count:
            high = middle
        else:
            low = middle + 1
    return low


# ---------------------------------------------------------------------------------------------------------------
# Ranking keys: [Hamming distance | fc7 distance (optional) | item | relevant (optional)], unique per item


@dataclass(frozen=True)
class KeyLayout:
    """Where each field of a ranking key starts (its shift), low to high."""
    dtype: type
    item_shift: int
    euclid_shift: int
    dist_shift: int


def key_layout(bits, num_items, euclidean=False, relevant=True):
    item_bits = max(1, int(num_items - 1).bit_length())
    euclid_bits = EUCLID_BITS if euclidean else 0
    low = 1 if relevant else 0
    total = int(bits).bit_length() + euclid_bits + item_bits + low
    if total > KEY_BITS:
        raise UserError(f"{num_items} database items with {bits}-bit codes{' and --rerank' if euclidean else ''} "
                        f"do not fit a {KEY_BITS}-bit ranking key; use fewer items")
    return KeyLayout(np.uint32 if total <= 32 else np.uint64, low, low + item_bits, low + item_bits + euclid_bits)


def float_keys(squared_distances, dtype=np.uint64):
    """float32 distances >= 0 -> integers that sort like them (-0.0 and rounding below 0 become +0.0)."""
    distances = np.maximum(squared_distances, np.float32(0))
    distances += np.float32(0)  # -0.0 + 0.0 = +0.0, whose bit pattern is 0
    return distances.view(np.uint32).astype(dtype)


def squared_euclidean(query_features, features, rows):
    """Squared fc7 Euclidean distances, float32 [q, len(rows)], from each query to features[rows].

    fp16 features are exact in float32; the distance is |x|^2 + |y|^2 - 2 x.y, read from features (which may be a
    memory map) in blocks of FC7_BLOCK rows in file order. All in torch on the CPU: its fp16 conversion is several
    times faster than numpy's on fc7 (mostly zeros), and one thread pool does the work (torch's and OpenBLAS's
    pools, mixed, fight over the cores).
    """
    queries = torch.from_numpy(np.array(query_features, dtype=np.float16)).float()  # [q, D]
    rows = np.asarray(rows, dtype=np.int64)
    by_row = np.argsort(rows, kind="stable")
    out = np.empty((len(queries), len(rows)), dtype=np.float32)
    query_norms = (queries * queries).sum(dim=1, keepdim=True)  # [q, 1]
    for start in range(0, len(rows), FC7_BLOCK):
        pick = by_row[start:start + FC7_BLOCK]
        block = torch.from_numpy(np.ascontiguousarray(features[rows[pick]])).float()  # [b, D]
        norms = query_norms + (block * block).sum(dim=1)[None, :]  # [q, b]
        out[:, pick] = torch.addmm(norms, queries, block.T, alpha=-2).numpy()
    np.maximum(out, np.float32(0), out=out)
    return out


@contextlib.contextmanager
def torch_threads(count):
    """torch's CPU threads for a while: 1 inside our own worker threads, --threads for large fc7 products.

    A parallel region waits for its slowest thread; on a busy machine that is a whole time slice, so small
    products on two threads ran 20 times slower than on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# Chunks of queries


def in_chunks(work, items, num_queries, bytes_per_item, threads, desc):
    """[work(start, stop) for each chunk of queries], in order, on `threads` threads, with a progress bar.

    A chunk holds as many queries as fit the memory budget (shared by the threads) at bytes_per_item per query
    and item, and no more than an even share of the queries per thread.
    """
    budget = items.budget // threads
    if items.on_gpu:
        budget, bytes_per_item = GPU_BUDGET, GPU_BYTES_PER_ITEM
    size = max(1, min(-(-num_queries // threads), budget // max(1, bytes_per_item * items.size)))
    chunks = [(start, min(num_queries, start + size)) for start in range(0, num_queries, size)]
    bar = tqdm(total=num_queries, desc=desc, unit="query", leave=False, mininterval=1)
    results = []
    with ThreadPoolExecutor(threads) if threads > 1 and len(chunks) > 1 else contextlib.nullcontext() as pool:
        done = pool.map(lambda chunk: work(*chunk), chunks) if pool else (work(*chunk) for chunk in chunks)
        for (start, stop), result in zip(chunks, done):
            results.append(result)
            bar.update(stop - start)
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# The full ranking and the metrics from where the relevant items land


def rank_chunk(items, query_codes, query_labels, layout, depth, query_features=None):
    """Rank a chunk of queries against every item; return where the relevant items land:

    (relevant_ranks: per query, the ascending 0-based ranks of its relevant items; within: int64 [q, bits + 1],
     items within Hamming radius r; top: bool [q, depth], relevance of the first depth ranks).
    """
    if items.on_gpu and query_features is None:
        return _gpu_rank_chunk(items, query_codes, query_labels, layout, depth)
    count = len(query_codes)
    distances = hamming_distances(items, query_codes)  # [q, N]
    squared = None if query_features is None else squared_euclidean(query_features, items.features, items.rows)
    item_keys = np.arange(items.size, dtype=layout.dtype) << layout.dtype(layout.item_shift)
    thresholds = np.arange(1, items.bits + 1, dtype=layout.dtype) << layout.dtype(layout.dist_shift)
    relevant_ranks, within = [], np.full((count, items.bits + 1), items.size, dtype=np.int64)
    top = np.empty((count, depth), dtype=bool)
    # one query at a time through the same buffers: a row of keys stays in the core's cache
    keys, relevant = np.empty(items.size, dtype=layout.dtype), np.empty(items.size, dtype=np.uint8)
    for i in range(count):
        np.left_shift(distances[i], layout.dist_shift, out=keys, dtype=layout.dtype)
        if squared is not None:
            keys |= float_keys(squared[i], layout.dtype) << layout.dtype(layout.euclid_shift)
        keys |= item_keys
        keys |= shares_label(query_labels[i:i + 1], items.labels)[0]
        keys.sort()  # the keys are unique: any sort is the ranking rule
        np.bitwise_and(keys, 1, out=relevant, casting="unsafe")
        relevant_ranks.append(np.flatnonzero(relevant.view(bool)))
        within[i, :items.bits] = np.searchsorted(keys, thresholds)  # items with distance < r + 1
        top[i] = relevant[:depth]
    return relevant_ranks, within, top


def _gpu_rank_chunk(items, query_codes, query_labels, layout, depth):
    """rank_chunk() with the keys built and sorted on the GPU; the relevant bits come from shares_label()."""
    keys = _gpu_distances(items, query_codes).long() << layout.dist_shift
    keys |= items.gpu["items"] << layout.item_shift
    keys |= torch.from_numpy(shares_label(query_labels, items.labels)).to(items.device)
    keys = torch.sort(keys, dim=1).values
    relevant = (keys & 1).bool()
    queries, ranks = relevant.nonzero(as_tuple=True)  # row-major: each query's ranks ascending
    thresholds = torch.arange(1, items.bits + 1, device=items.device, dtype=torch.int64) << layout.dist_shift
    within = torch.searchsorted(keys, thresholds.expand(len(keys), -1).contiguous()).cpu().numpy()
    counts = np.bincount(queries.cpu().numpy(), minlength=len(keys))
    relevant_ranks = np.split(ranks.cpu().numpy().astype(np.int64), np.cumsum(counts)[:-1])
    within = np.concatenate([within.astype(np.int64), np.full((len(keys), 1), items.size)], axis=1)
    return relevant_ranks, within, relevant[:, :depth].cpu().numpy()


def metrics_from_ranks(relevant_ranks, within, top, k):
    """Per-query metrics from where each query's relevant items land in its ranking (rank_chunk's result).

    k: the depth of AP@k. Returns ap_all, ap_k [q], precision, recall [q, bits + 1] within each radius, and hits
    [depth]: relevant items at each rank summed over the queries.
    """
    num = len(relevant_ranks)
    ap_all = np.zeros(num)
    relevant_within = np.empty(within.shape, dtype=np.int64)
    total_relevant = np.array([len(r) for r in relevant_ranks], dtype=np.int64)
    for i, ranks in enumerate(relevant_ranks):
        if len(ranks):  # P at the m-th relevant item is m / (its rank + 1)
            ap_all[i] = np.sum(np.arange(1, len(ranks) + 1) / (ranks + 1)) / len(ranks)
        relevant_within[i] = np.searchsorted(ranks, within[i])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(within > 0, relevant_within / within, 0.0)
        recall = np.where(total_relevant[:, None] > 0, relevant_within / total_relevant[:, None], 0.0)
    hits = np.cumsum(top, axis=1, dtype=np.int64)  # [q, depth] relevant within the first k
    gains = (hits[:, :k] * top[:, :k]) / np.arange(1, k + 1)
    found = hits[:, k - 1]
    ap_k = np.where(found > 0, gains.sum(axis=1) / np.maximum(found, 1), 0.0)
    return {"ap_all": ap_all, "ap_k": ap_k, "precision": precision, "recall": recall, "hits": hits.sum(axis=0)}


def evaluate(items, query_codes, query_labels, topk=1000, query_features=None):
    """Every metric of the module docstring for these queries, as a dict of arrays and means.

    query_labels take the form of the items' labels: int64 [q] or multi-hot bool/uint8 [q, C]; queries without a
    label are the caller's to leave out (labelled()). query_features (fp16 [q, D]) re-rank equal Hamming
    distances by fc7 Euclidean distance.
    """
    if items.labels is None or len(query_codes) == 0:
        raise ValueError("evaluate needs the database labels and at least one query")
    query_labels = np.asarray(query_labels)
    query_labels = query_labels.astype(np.int64) if query_labels.ndim == 1 else query_labels != 0
    rerank = query_features is not None
    layout = key_layout(items.bits, items.size, euclidean=rerank)
    k = min(topk, items.size)
    depth = max(k, min(CURVE_DEPTH, items.size))
    threads = 1 if items.on_gpu or rerank else items.threads  # BLAS already uses every core for the fc7 products
    # per query and item: its distance, its rank when relevant (int64), with --rerank its fc7 distance (float32)
    bytes_per_item = np.dtype(items.dist_dtype).itemsize + 8 + (4 if rerank else 0)

    def work(start, stop):
        features = query_features[start:stop] if rerank else None
        return metrics_from_ranks(*rank_chunk(items, query_codes[start:stop], query_labels[start:stop], layout,
                                              depth, features), k)

    with torch_threads(items.threads):  # only the fc7 products of --rerank use torch's threads
        results = in_chunks(work, items, len(query_codes), bytes_per_item, threads, "rank")
    per_query = {name: np.concatenate([r[name] for r in results]) for name in results[0] if name != "hits"}
    hits = np.sum([r["hits"] for r in results], axis=0)  # int64 [depth]: exact, so chunking cannot change it
    curve = min(CURVE_DEPTH, items.size)
    radius = min(HEADLINE_RADIUS, items.bits)
    return {
        "map_all": float(np.mean(per_query["ap_all"])), "map_topk": float(np.mean(per_query["ap_k"])), "topk": k,
        "precision_r2": float(np.mean(per_query["precision"][:, radius])),
        "recall_r2": float(np.mean(per_query["recall"][:, radius])),
        "precision_at_k": hits[:curve] / (len(query_codes) * np.arange(1, curve + 1)),
        "pr_precision": per_query["precision"].mean(axis=0), "pr_recall": per_query["recall"].mean(axis=0),
        "per_query": per_query,
    }


# ---------------------------------------------------------------------------------------------------------------
# Top k by Hamming distance


def topk(items, query_codes, k):
    """The first min(k, N) items of each query's ranking: (file rows int64 [q, k], Hamming distances [q, k]).

    On the CPU: the items within the smallest radius holding k of them, stably sorted by distance, instead of a
    sort of all N.
    """
    k = min(k, items.size)
    threads = 1 if items.on_gpu else items.threads

    def work(start, stop):
        if items.on_gpu:
            return _gpu_topk(items, query_codes[start:stop], k)
        distances = hamming_distances(items, query_codes[start:stop])
        best = np.empty((len(distances), k), dtype=np.int64)  # items, in tie order
        for i, row in enumerate(distances):
            candidates = np.flatnonzero(row <= smallest_radius(row, k, items.bits))
            best[i] = candidates[np.argsort(row[candidates], kind="stable")[:k]]
        return best, np.take_along_axis(distances, best, axis=1)

    results = in_chunks(work, items, len(query_codes), 2 + np.dtype(items.dist_dtype).itemsize, threads, "top-k")
    best = np.concatenate([r[0] for r in results]) if results else np.zeros((0, k), np.int64)
    distances = np.concatenate([r[1] for r in results]) if results else np.zeros((0, k), items.dist_dtype)
    return items.rows[best], distances


def _gpu_topk(items, query_codes, k):
    layout = key_layout(items.bits, items.size, relevant=False)
    keys = (_gpu_distances(items, query_codes).long() << layout.dist_shift) | items.gpu["items"]
    best = torch.topk(keys, k, dim=1, largest=False, sorted=True).values.cpu().numpy()
    return best & ((1 << layout.dist_shift) - 1), (best >> layout.dist_shift).astype(items.dist_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Coarse to fine: DLBHC's retrieval


def rank_by_fc7(query_feature, features, rows, items, topk, layout):
    """The coarse-to-fine order of a candidate set: fc7 Euclidean distance to the query, equal distances in tie order.

    rows: the candidates' file rows; items: their places in tie order, ascending (fc7 rows are read in this order
    whoever found the candidates, the scan or an index, so every distance is computed alike); query_feature: fp16
    [1, D]. Returns (indices into the candidates of the first topk, best first; their Euclidean distances).
    """
    squared = squared_euclidean(query_feature, features, rows)[0]
    keys = (float_keys(squared) << np.uint64(layout.euclid_shift)) | np.asarray(items).astype(np.uint64)
    keys.sort()
    best = (keys[:topk] & np.uint64((1 << layout.euclid_shift) - 1)).astype(np.int64)
    where = np.searchsorted(items, best)
    return where, np.sqrt(squared[where], dtype=np.float32)


def coarse_to_fine(items, query_codes, query_features, radius, topk, grow=True):
    """Candidates within a Hamming radius, ranked by fc7 Euclidean distance; ties in the tie order.

    With grow, the radius becomes r' = the smallest radius >= `radius` holding at least min(topk, N) items.
    Returns one dict per query: rows (file rows of the first topk candidates, best first), hamming, euclidean
    (distances, not squared), radius (r'), candidates (their count).
    """
    if items.features is None:
        raise ValueError("coarse_to_fine needs the database features")
    layout = key_layout(items.bits, items.size, euclidean=True, relevant=False)

    def work(start, stop):
        results = []
        for i, row in enumerate(hamming_distances(items, query_codes[start:stop])):
            used = max(radius, smallest_radius(row, min(topk, items.size), items.bits)) if grow else radius
            candidates = np.flatnonzero(row <= used)  # items, ascending
            where, euclidean = rank_by_fc7(query_features[start + i:start + i + 1], items.features,
                                           items.rows[candidates], candidates, topk, layout)
            best = candidates[where]
            results.append({"rows": items.rows[best], "hamming": row[best].astype(np.int64), "euclidean": euclidean,
                            "radius": int(used), "candidates": len(candidates)})
        return results

    # queries spread over our threads, each product single-threaded: small products gain nothing from more
    with torch_threads(1):
        chunks = in_chunks(work, items, len(query_codes), 2 + np.dtype(items.dist_dtype).itemsize, items.threads,
                           "retrieve")
    return [found for chunk in chunks for found in chunk]


# ---------------------------------------------------------------------------------------------------------------
# The radius study of search.py


def radius_study(items, query_codes, query_labels, query_features, radii, depth=10):
    """For each radius r, the candidates within r re-ranked by fc7 Euclidean distance, as coarse_to_fine ranks them.

    Per query and radius: candidates (count), precision (relevant among the first min(depth, candidates) over
    that number; 0 with no candidate), ap (AP of the re-ranked candidate list, normalised by its relevant
    candidates; 0 with none). query_labels: as in evaluate(). Returns a dict of arrays [q, len(radii)].
    """
    layout = key_layout(items.bits, items.size, euclidean=True, relevant=False)
    item_ids = np.arange(items.size, dtype=np.uint64)
    item_mask = np.uint64((1 << layout.euclid_shift) - 1)
    query_labels = np.asarray(query_labels)
    shape = (len(query_codes), len(radii))
    out = {"candidates": np.zeros(shape, np.int64), "precision": np.zeros(shape), "ap": np.zeros(shape)}

    def work(start, stop):
        distances = hamming_distances(items, query_codes[start:stop])
        squared = squared_euclidean(query_features[start:stop], items.features, items.rows)  # [q, N]
        for i in range(stop - start):
            # the candidates within r, re-ranked, are the items within r in the order of all items re-ranked
            keys = (float_keys(squared[i]) << np.uint64(layout.euclid_shift)) | item_ids
            keys.sort()
            order = (keys & item_mask).astype(np.int64)
            dist_in_order = distances[i][order]
            relevant_in_order = shares_label(query_labels[start + i:start + i + 1], items.labels)[0][order]
            for j, radius in enumerate(radii):
                relevant = relevant_in_order[dist_in_order <= radius]
                count, hits = len(relevant), np.flatnonzero(relevant)
                out["candidates"][start + i, j] = count
                if count:
                    out["precision"][start + i, j] = np.count_nonzero(relevant[:depth]) / min(depth, count)
                if len(hits):
                    out["ap"][start + i, j] = np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / len(hits)
                if count == items.size:  # every item is a candidate: larger radii give the same figures
                    for name in out:
                        out[name][start + i, j + 1:] = out[name][start + i, j]
                    break

    # one thread: the fc7 products use torch's threads. Per query and item: distance and fc7 distance, and room
    # for a query's keys, order and temporaries
    with torch_threads(items.threads):
        in_chunks(work, items, len(query_codes), 40, 1, "radius")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Setting up a stage: the shared flags, the database's items, the radius


def retrieval_args_parser(add_help=False, result_help="folder for what the stage writes"):
    """The flags of every stage that ranks (mAP.py, search.py, query.py, demo.py), as a parent parser."""
    parser = argparse.ArgumentParser(add_help=add_help)
    parser.add_argument("--bits", type=positive_int, required=True, help="code length; must match the database")
    parser.add_argument("--database", default="database", help="folder written by database.py (default: %(default)s)")
    parser.add_argument("--result", default="result", help=f"{result_help} (default: %(default)s)")
    parser.add_argument("--ties", default="shuffle", choices=TIES,
                        help="order of equal distances: a fixed seeded shuffle, or database order (default: %(default)s)")
    parser.add_argument("--threads", type=threads_int, default=os.cpu_count() or 1,
                        help="CPU threads ranking chunks of queries (default: %(default)s, the cores)")
    parser.add_argument("--memory-mb", type=memory_mb, default=256,
                        help="working memory for chunks of queries on the CPU (default: %(default)s)")
    return parser


def coarse_to_fine_args_parser(add_help=False):
    """The flags of query.py and demo.py: the radius, k, and the model and batch size for --image."""
    parser = argparse.ArgumentParser(add_help=add_help)
    parser.add_argument("--radius", type=non_negative_int, default=None,
                        help="Hamming radius of the candidates (default: result/search_<bits>bits.json's "
                             f"recommendation for this model, else {DEFAULT_RADIUS})")
    parser.add_argument("--topk", type=positive_int, default=10, help="results per query (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="with --image: the model that built the database (default: the one meta.json names)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="with --image: images per forward pass (default: %(default)s)")
    return parser


def items_for_metrics(db, args, device, features=False):
    """Items of the labelled database items, or a UserError when there are none."""
    take = labelled(db.labels)
    if len(take) == 0:
        raise UserError(f"no item in {args.database}/db_label.npy has a label (all -1), so there is nothing to "
                        "measure; give the database list labels, or use query.py for unlabelled data")
    return prepare_items(db.codes, args.bits, db.labels, db.features if features else None, take, args.ties, device,
                         args.threads, args.memory_mb)


def labelled_queries(query, args):
    """Indices of the labelled queries, or a UserError when there are none."""
    take = labelled(query.labels)
    if len(take) == 0:
        raise UserError(f"no query in {args.database}/query_label.npy has a label (all -1), so there is nothing to "
                        "measure; give data/query/list.txt labels, or use query.py for unlabelled queries")
    return take


def default_radius(args, meta):
    """(radius, where it came from): --radius, else search.py's recommendation for this very model, else 2."""
    if args.radius is not None:
        if not 0 <= args.radius <= args.bits:
            raise UserError(f"--radius {args.radius}: give a radius between 0 and --bits {args.bits}")
        return args.radius, "--radius"
    path = Path(args.result) / f"search_{args.bits}bits.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse_json_constant)
            radius = int(found["recommended_radius"])
        except (ValueError, KeyError, TypeError, RecursionError):  # not strict JSON counts as unreadable
            print(f"note: {path} is unreadable; using radius {DEFAULT_RADIUS} (rerun: python search.py --bits "
                  f"{args.bits})", file=sys.stderr)
            return DEFAULT_RADIUS, "default"
        if found.get("model_sha256") == meta.get("model_sha256") and found.get("bits") == args.bits:
            return radius, str(path)
        print(f"note: {path} was measured on another model than {args.database}'s; using radius {DEFAULT_RADIUS} "
              f"(rerun: python search.py --bits {args.bits})", file=sys.stderr)
    return DEFAULT_RADIUS, "default"


def open_retrieval(args):
    """Where query.py and demo.py start: (device, db, query, meta, radius, where the radius came from, Items).

    Every database item takes part, labelled or not.
    """
    device = pick_device(args.device)
    db, query, meta = database.load_database(args.database, args.bits, features=True)
    radius, radius_from = default_radius(args, meta)
    if len(db.codes) == 0:
        raise UserError(f"{args.database} holds no database item; build it with: python database.py --bits {args.bits}")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: give a positive number of results")
    items = prepare_items(db.codes, args.bits, db.labels, db.features, None, args.ties, device, args.threads,
                          args.memory_mb)
    return device, db, query, meta, radius, radius_from, items


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("mAP.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(data_root=False),
                                              retrieval_args_parser(result_help="folder for the JSON and figures")],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topk", type=positive_int, default=None,
                        help="k of mAP@k (default: the protocol's k where prepare_data.py recorded one, else 1000)")
    parser.add_argument("--rerank", action="store_true",
                        help="order equal Hamming distances by fc7 Euclidean distance (reads the features)")
    return parser


def plot_curves(result_dir, bits, suffix, metrics):
    """result/pr_<bits>bits<suffix>.png and pk_<bits>bits<suffix>.png, headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(metrics["pr_recall"], metrics["pr_precision"], marker="o", markersize=3)
    for radius in range(0, bits + 1, max(1, bits // 8)):
        axes.annotate(str(radius), (metrics["pr_recall"][radius], metrics["pr_precision"][radius]), fontsize=7)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
             title=f"{bits} bits: precision-recall within Hamming radius r (labels: r)")
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    paths.append(Path(result_dir) / f"pr_{bits}bits{suffix}.png")
    atomic_write(paths[-1], lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(5, 4))
    curve = metrics["precision_at_k"]
    axes.plot(np.arange(1, len(curve) + 1), curve)
    axes.set(xlabel="k", ylabel="precision@k", ylim=(0, 1.02), title=f"{bits} bits: precision of the top k")
    axes.grid(alpha=0.3)
    paths.append(Path(result_dir) / f"pk_{bits}bits{suffix}.png")
    atomic_write(paths[-1], lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return paths


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    if args.topk is not None and args.topk < 1:
        raise UserError(f"--topk {args.topk}: give a positive number of results")
    started = time.perf_counter()
    device = pick_device(args.device)
    db, query, meta = database.load_database(args.database, args.bits, features=args.rerank)
    items = items_for_metrics(db, args, device, features=args.rerank)
    protocol = meta.get("protocol") or {}
    if args.topk is None:  # the protocol's k; its "topk": null is mAP over the whole ranking
        args.topk = (protocol.get("topk") or items.size) if protocol else 1000
    take = labelled_queries(query, args)
    query_features = query.features[take] if args.rerank else None
    metrics = evaluate(items, query.codes[take], query.labels[take], args.topk, query_features)
    suffix = "_rerank" if args.rerank else ""
    result = {
        "map_all": metrics["map_all"], "map_topk": metrics["map_topk"], "topk": args.topk, "topk_used": metrics["topk"],
        "precision_r2": metrics["precision_r2"], "recall_r2": metrics["recall_r2"],
        "num_queries": len(take), "num_database": items.size,
        "skipped_queries": int(len(query.labels) - len(take)), "skipped_database": int(len(db.labels) - items.size),
        "protocol": protocol.get("name"), "label_kind": meta.get("label_kind", "single"),
        "ties": args.ties, "rerank": args.rerank, "bits": args.bits, "model": meta.get("model"),
        "model_sha256": meta.get("model_sha256"), "device": str(device),
        "curves": {
            "precision_at_k": [round(float(v), 6) for v in metrics["precision_at_k"]],
            "pr": {"radius": list(range(args.bits + 1)),
                   "precision": [round(float(v), 6) for v in metrics["pr_precision"]],
                   "recall": [round(float(v), 6) for v in metrics["pr_recall"]]},
        },
        "seconds": elapsed(started), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
    }
    path = Path(args.result) / f"map_{args.bits}bits{suffix}.json"
    write_json(path, result)
    figures = plot_curves(args.result, args.bits, suffix, metrics)
    print(f"{'metric':<16}{'value':>10}")
    for name in ("map_all", "map_topk", "precision_r2", "recall_r2"):
        label = f"mAP@{metrics['topk']}" if name == "map_topk" else name
        print(f"{label:<16}{result[name]:>10.4f}")
    print(f"{'queries':<16}{len(take):>10}  (skipped {result['skipped_queries']} unlabelled)")
    print(f"{'database':<16}{items.size:>10}  (skipped {result['skipped_database']} unlabelled)")
    print(f"wrote {path}, {', '.join(str(f) for f in figures)} in {result['seconds']} s (ties {args.ties})")


if __name__ == "__main__":
    run_main(main)
