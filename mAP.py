"""Hamming ranking and the retrieval metrics: the one ranking rule every later stage imports from here.

    python mAP.py --bits 48                          # mAP over the full ranking, mAP@1000, P@k, PR within a radius
    python mAP.py --bits 48 --topk 500               # mAP@500 instead of mAP@1000
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

The metrics (relevant = same label; queries and database items labelled -1 take no part), averaged over queries:
    AP over the full ranking = (1/R) sum_i P(i) rel(i), R = relevant items in the database; 0 when R = 0
    AP@k = (1/R_k) sum_{i<=k} P(i) rel(i), R_k = relevant items within the top k; 0 when R_k = 0
    P@k for k = 1..min(1000, N)
    within Hamming radius r: precision = relevant within r / items within r (0 when none),
    recall = relevant within r / R (0 when R = 0); r = 0..bits is the PR curve, r = 2 the headline figure.

How it is fast. The database is held in tie order, so the position of an item in that order breaks ties; a
ranking is then the ascending sort of one integer key per item, [Hamming distance | (fc7 distance) | position |
relevant], unique per item, so any sort gives the same order. Distances are XOR + popcount on packed uint64 words;
queries go in chunks sized from a memory budget, across threads (numpy releases the GIL). AP needs only where the
relevant items land (the low key bit after sorting), and everything within a radius is a binary search in the
sorted keys. On CUDA the distances are the exact +-1 product, (bits - q.d) / 2, and the keys sort on the GPU; the
results are the CPU's, integer for integer.
"""
import argparse
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import database
from net import pick_device
from stage import (UserError, atomic_write, common_args_parser, elapsed, memory_mb, positive_int, print_args, run_main,
                   threads_int, write_json)

TIES = ("shuffle", "index")
CURVE_DEPTH = 1000  # P@k is reported for k = 1..min(CURVE_DEPTH, N)
GPU_BUDGET = 2 << 30  # bytes of working tensors per chunk of queries on the GPU
DISTANCE_BLOCK = 65536  # items per XOR + popcount step: 512 kB of uint64 scratch, within a core's L2 cache


# ---------------------------------------------------------------------------------------------------------------
# The ranking rule


def tie_order(num_items, ties="shuffle"):
    """Item indices in tie order: order[0] comes first among items at equal distance."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if ties == "index":
        return np.arange(num_items, dtype=np.int64)
    return np.random.default_rng(0).permutation(num_items)


def code_words(codes):
    """Packed codes uint8 [N, B] -> uint64 words [W, N], W = ceil(B / 8); padding bytes are 0 and never differ."""
    codes = np.asarray(codes, dtype=np.uint8)
    width = -(-codes.shape[1] // 8) * 8
    padded = np.zeros((len(codes), width), dtype=np.uint8)
    padded[:, :codes.shape[1]] = codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


@dataclass(frozen=True)
class KeyLayout:
    """Bit fields of a ranking key, high to low: Hamming distance, fc7 distance (optional), position, relevant."""
    dtype: type
    position_shift: int
    euclid_shift: int
    dist_shift: int


def key_layout(bits, num_items, euclidean=False, relevant=True):
    position_bits = max(1, int(num_items - 1).bit_length())
    euclid_bits = 31 if euclidean else 0  # a non-negative float32 orders like its bit pattern, and its sign bit is 0
    low = 1 if relevant else 0
    total = int(bits).bit_length() + euclid_bits + position_bits + low
    if total > 63:  # 63, not 64: torch's int64 is signed
        raise UserError(f"{num_items} database items with {bits}-bit codes{' and --rerank' if euclidean else ''} "
                        "do not fit a 63-bit ranking key; use fewer items")
    return KeyLayout(np.uint32 if total <= 32 else np.uint64, low, low + position_bits,
                     low + position_bits + euclid_bits)


def float_keys(squared_distances, dtype=np.uint64):
    """float32 distances >= 0 -> integers that sort like them (-0.0 and rounding below 0 become +0.0)."""
    distances = np.maximum(squared_distances, np.float32(0))
    distances += np.float32(0)  # -0.0 + 0.0 = +0.0, whose bit pattern is 0
    return distances.view(np.uint32).astype(dtype)


def squared_euclidean(query_features, features, rows, block=4096):
    """Squared fc7 Euclidean distances, float32 [q, len(rows)], from each query to features[rows].

    fp16 features are exact in float32; the distance is |x|^2 + |y|^2 - 2 x.y, read from features (which may be a
    memory map) in blocks of rows in file order. All in torch on the CPU: its fp16 conversion is several times
    faster than numpy's on fc7 (mostly zeros), and one thread pool does the work (torch's and OpenBLAS's pools,
    mixed, fight over the cores).
    """
    queries = torch.from_numpy(np.array(query_features, dtype=np.float16)).float()  # [q, D]
    rows = np.asarray(rows, dtype=np.int64)
    by_row = np.argsort(rows, kind="stable")
    out = np.empty((len(queries), len(rows)), dtype=np.float32)
    query_norms = (queries * queries).sum(dim=1, keepdim=True)  # [q, 1]
    for start in range(0, len(rows), block):
        pick = by_row[start:start + block]
        items = torch.from_numpy(np.ascontiguousarray(features[rows[pick]])).float()  # [b, D]
        norms = query_norms + (items * items).sum(dim=1)[None, :]  # [q, b]
        out[:, pick] = torch.addmm(norms, queries, items.T, alpha=-2).numpy()
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


def smallest_radius(distances, count, bits):
    """The smallest r with at least `count` items at Hamming distance <= r (1 <= count <= len(distances)).

    A binary search of counts (each a vectorised pass, no histogram) whose first probes are a guess from a sorted
    sample of about 16,384 items and its neighbours: usually two or three passes instead of log2(bits).
    """
    step = max(1, len(distances) // 16384)
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


class Ranking:
    """The database side of the ranking rule, prepared once.

    codes, labels, features are the arrays of a database split (features may be a memory map); take lists the rows
    that take part (default: all). Items are held in tie order: position p is the file row self.rows[p], so a
    stable order by distance, or a key whose low bits are p, is exactly the ranking rule. Every result is given as
    file rows.
    """

    def __init__(self, codes, bits, labels=None, features=None, take=None, ties="shuffle", device=None,
                 threads=None, memory_mb=256):
        take = np.arange(len(codes), dtype=np.int64) if take is None else np.asarray(take, dtype=np.int64)
        self.bits, self.ties, self.size = bits, ties, len(take)
        if self.size == 0:
            raise UserError("the database has no item that takes part; build one with: python database.py "
                            f"--bits {bits}")
        self.rows = take[tie_order(self.size, ties)]
        self.codes = np.asarray(codes)[self.rows]  # uint8 [N, B], tie order
        self.words = code_words(self.codes)  # uint64 [W, N]
        self.labels = None if labels is None else np.asarray(labels)[self.rows].astype(np.int64)
        self.features = features
        self.device = device or torch.device("cpu")
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.budget = int(memory_mb) << 20
        self.dist_dtype = np.uint8 if bits <= 255 else np.uint16
        self.on_gpu = self.device.type == "cuda" and bits <= 2048  # +-1 sums stay exact in fp16 up to 2048
        self._cache = {}  # tensors on the GPU and key parts, made on first use

    # --- distances ---------------------------------------------------------------------------------------------

    def distances(self, query_codes):
        """Hamming distance from each query to every item in tie order: numpy [q, N] uint8 (uint16 past 255 bits)."""
        if self.on_gpu:
            return self._gpu_distances(query_codes).cpu().numpy().astype(self.dist_dtype)
        query_words = code_words(query_codes)  # [W, q]
        out = np.empty((query_words.shape[1], self.size), dtype=self.dist_dtype)
        scratch, counts = self._distance_buffers()
        for start in range(0, self.size, len(scratch)):  # a block of items stays in cache across the queries
            stop = min(self.size, start + len(scratch))
            for i in range(query_words.shape[1]):
                self._distance_block(query_words[:, i], start, stop, out[i, start:stop], scratch, counts)
        return out

    def _distance_buffers(self):
        block = min(self.size, DISTANCE_BLOCK)
        return np.empty(block, dtype=np.uint64), np.empty(block, dtype=self.dist_dtype)

    def _distance_row(self, query_words, out, scratch, counts):
        """Distances [N] of one query (uint64 words [W]) into out; scratch, counts: _distance_buffers()."""
        for start in range(0, self.size, len(scratch)):
            stop = min(self.size, start + len(scratch))
            self._distance_block(query_words, start, stop, out[start:stop], scratch, counts)

    def _distance_block(self, query_words, start, stop, out, scratch, counts):
        """Distances of one query to items start..stop, in blocks small enough for the XOR scratch to stay in the
        core's cache (1.7x faster than one pass at a million items)."""
        xor = scratch[:stop - start]
        for w, words in enumerate(self.words):
            np.bitwise_xor(words[start:stop], query_words[w], out=xor)
            if w == 0:
                np.bitwise_count(xor, out=out)
            else:
                np.bitwise_count(xor, out=counts[:stop - start])
                out += counts[:stop - start]

    def _gpu_tensor(self, name):
        if name not in self._cache:
            if name == "signs":
                value = _signs(self.codes, self.bits, self.device)
            elif name == "positions":
                value = torch.arange(self.size, device=self.device, dtype=torch.int64)
            else:
                value = torch.from_numpy(self.labels).to(self.device)
            self._cache[name] = value
        return self._cache[name]

    def _gpu_distances(self, query_codes):
        """int32 [q, N] on the GPU: (bits - q.d) / 2 from +-1 codes; every partial sum is an integer <= bits."""
        dots = _signs(query_codes, self.bits, self.device) @ self._gpu_tensor("signs").T  # [q, N] fp16
        return (self.bits - dots.to(torch.int32)) // 2

    # --- chunks of queries -------------------------------------------------------------------------------------

    def _chunks(self, num_queries, bytes_per_item, threads):
        """(start, stop) of chunks of queries whose working arrays take bytes_per_item per query and item."""
        budget = self.budget // threads
        if self.on_gpu:  # fp16 products, int32 distances, int64 keys, sorted keys and their indices
            budget, bytes_per_item = GPU_BUDGET, 48
        rows = max(1, min(-(-num_queries // threads), budget // max(1, bytes_per_item * self.size)))
        return [(start, min(num_queries, start + rows)) for start in range(0, num_queries, rows)]

    def _map(self, work, chunks, threads, desc):
        """work(start, stop) for every chunk, in order, on `threads` threads, with a progress bar."""
        bar = tqdm(total=chunks[-1][1] if chunks else 0, desc=desc, unit="query", leave=False, mininterval=1)
        results = []
        if threads == 1 or len(chunks) == 1:
            for start, stop in chunks:
                results.append(work(start, stop))
                bar.update(stop - start)
        else:
            with ThreadPoolExecutor(threads) as pool:
                for (start, stop), result in zip(chunks, pool.map(lambda chunk: work(*chunk), chunks)):
                    results.append(result)
                    bar.update(stop - start)
        bar.close()
        return results

    # --- top k by Hamming distance -----------------------------------------------------------------------------

    def topk(self, query_codes, k):
        """The first min(k, N) items of each query's ranking: (file rows int64 [q, k], Hamming distances [q, k])."""
        k = min(k, self.size)
        threads = 1 if self.on_gpu else self.threads

        def work(start, stop):
            if self.on_gpu:
                return self._gpu_topk(query_codes[start:stop], k)
            distances = self.distances(query_codes[start:stop])
            positions = np.empty((len(distances), k), dtype=np.int64)
            for i, row in enumerate(distances):
                candidates = np.flatnonzero(row <= smallest_radius(row, k, self.bits))  # positions: tie order
                positions[i] = candidates[np.argsort(row[candidates], kind="stable")[:k]]
            return positions, np.take_along_axis(distances, positions, axis=1)

        chunks = self._chunks(len(query_codes), 2 + np.dtype(self.dist_dtype).itemsize, threads)
        results = self._map(work, chunks, threads, "top-k")
        positions = np.concatenate([r[0] for r in results]) if results else np.zeros((0, k), np.int64)
        dists = np.concatenate([r[1] for r in results]) if results else np.zeros((0, k), self.dist_dtype)
        return self.rows[positions], dists

    def _gpu_topk(self, query_codes, k):
        layout = key_layout(self.bits, self.size, relevant=False)
        keys = (self._gpu_distances(query_codes).long() << layout.dist_shift) | self._gpu_tensor("positions")
        best = torch.topk(keys, k, dim=1, largest=False, sorted=True).values.cpu().numpy()
        return best & ((1 << layout.dist_shift) - 1), (best >> layout.dist_shift).astype(self.dist_dtype)

    # --- coarse to fine ----------------------------------------------------------------------------------------

    def coarse_to_fine(self, query_codes, query_features, radius, topk, grow=True):
        """DLBHC's retrieval: candidates within a Hamming radius, ranked by fc7 Euclidean distance.

        With grow, the radius becomes r' = the smallest radius >= `radius` holding at least min(topk, N) items.
        Ties in Euclidean distance follow the tie order. Returns one dict per query: rows (file rows of the first
        topk candidates, best first), hamming, euclidean (distances, not squared), radius (r'), candidates (count).
        """
        if self.features is None:
            raise ValueError("coarse_to_fine needs the database features")
        layout = key_layout(self.bits, self.size, euclidean=True, relevant=False)
        positions_mask = np.uint64((1 << layout.euclid_shift) - 1)

        def work(start, stop):
            results = []
            for i, row in enumerate(self.distances(query_codes[start:stop])):
                used = radius
                if grow:
                    used = max(radius, smallest_radius(row, min(topk, self.size), self.bits))
                candidates = np.flatnonzero(row <= used)  # positions in tie order, ascending
                squared = squared_euclidean(query_features[start + i:start + i + 1], self.features,
                                            self.rows[candidates])[0]
                keys = (float_keys(squared) << np.uint64(layout.euclid_shift)) | candidates.astype(np.uint64)
                keys.sort()
                best = (keys[:topk] & positions_mask).astype(np.int64)
                where = np.searchsorted(candidates, best)
                results.append({"rows": self.rows[best], "hamming": row[best].astype(np.int64),
                                "euclidean": np.sqrt(squared[where], dtype=np.float32), "radius": int(used),
                                "candidates": len(candidates)})
            return results

        # queries spread over our threads, each product single-threaded: small products gain nothing from more
        with torch_threads(1):
            chunks = self._chunks(len(query_codes), 2 + np.dtype(self.dist_dtype).itemsize, self.threads)
            return [found for part in self._map(work, chunks, self.threads, "retrieve") for found in part]

    def radius_metrics(self, query_codes, query_labels, query_features, radii, depth=10):
        """search.py's study: for each radius r, the candidates within r re-ranked by fc7 Euclidean distance.

        Per query and radius: candidates (count), precision (relevant among the first min(depth, candidates) over
        that number; 0 with no candidate), ap (AP of the re-ranked candidate list, normalised by its relevant
        candidates; 0 with none). Returns a dict of arrays [q, len(radii)].
        """
        layout = key_layout(self.bits, self.size, euclidean=True, relevant=False)
        positions = np.arange(self.size, dtype=np.uint64)
        with torch_threads(self.threads):
            return self._radius_metrics(query_codes, query_labels, query_features, radii, depth, layout, positions)

    def _radius_metrics(self, query_codes, query_labels, query_features, radii, depth, layout, positions):
        shape = (len(query_codes), len(radii))
        out = {"candidates": np.zeros(shape, np.int64), "precision": np.zeros(shape), "ap": np.zeros(shape)}
        for start, stop in tqdm(self._chunks(len(query_codes), 40, 1), desc="radius", unit="chunk", leave=False):
            distances = self.distances(query_codes[start:stop])
            squared = squared_euclidean(query_features[start:stop], self.features, self.rows)  # [q, N], tie order
            for i in range(stop - start):
                # the candidates within r, re-ranked, are the items within r in the order of all items re-ranked
                keys = (float_keys(squared[i]) << np.uint64(layout.euclid_shift)) | positions
                keys.sort()
                order = (keys & np.uint64((1 << layout.euclid_shift) - 1)).astype(np.int64)
                dist_in_order = distances[i][order]
                relevant_in_order = self.labels[order] == query_labels[start + i]
                for j, radius in enumerate(radii):
                    relevant = relevant_in_order[dist_in_order <= radius]
                    count, hits = len(relevant), np.flatnonzero(relevant)
                    out["candidates"][start + i, j] = count
                    if count:
                        out["precision"][start + i, j] = np.count_nonzero(relevant[:depth]) / min(depth, count)
                    if len(hits):
                        out["ap"][start + i, j] = np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / len(hits)
                    if count == self.size:  # every item is a candidate: larger radii give the same figures
                        for name in out:
                            out[name][start + i, j + 1:] = out[name][start + i, j]
                        break
        return out

    # --- the full ranking, summarised for the metrics ------------------------------------------------------------

    def _rank_chunk(self, query_codes, query_labels, layout, depth, query_features):
        """Rank a chunk of queries against every item; return where the relevant items land.

        (relevant positions: a list of int64 arrays, 0-based ranks of the relevant items, ascending;
         within: int64 [q, bits + 1], items within Hamming radius r; top: bool [q, depth], relevance of the first
         depth ranks).
        """
        if self.on_gpu and query_features is None:
            return self._gpu_rank_chunk(query_codes, query_labels, layout, depth)
        count = len(query_codes)
        positions, within = [], np.full((count, self.bits + 1), self.size, dtype=np.int64)
        top = np.empty((count, depth), dtype=bool)
        thresholds = np.arange(1, self.bits + 1, dtype=layout.dtype) << layout.dtype(layout.dist_shift)
        relevant = np.empty(self.size, dtype=np.uint8)
        if query_features is None:
            # one query at a time through the same buffers: a row of keys stays in the core's cache
            query_words = code_words(query_codes)  # [W, q]
            distances, keys = np.empty(self.size, self.dist_dtype), np.empty(self.size, layout.dtype)
            buffers = self._distance_buffers()
        else:
            chunk_keys = np.left_shift(self.distances(query_codes), layout.dist_shift, dtype=layout.dtype)  # [q, N]
            squared = squared_euclidean(query_features, self.features, self.rows)  # [q, N], tie order
            chunk_keys |= float_keys(squared, layout.dtype) << layout.dtype(layout.euclid_shift)
            del squared
        for i in range(count):
            if query_features is None:
                self._distance_row(query_words[:, i], distances, *buffers)
                np.left_shift(distances, layout.dist_shift, out=keys, dtype=layout.dtype)
            else:
                keys = chunk_keys[i]
            keys |= self._label_keys(layout, query_labels[i])  # position and relevant bits
            keys.sort()  # the keys are unique: any sort is the ranking rule
            np.bitwise_and(keys, 1, out=relevant, casting="unsafe")
            positions.append(np.flatnonzero(relevant.view(bool)))
            within[i, :self.bits] = np.searchsorted(keys, thresholds)  # items with distance < r + 1
            top[i] = relevant[:depth]
        return positions, within, top

    def _label_keys(self, layout, label):
        """The low key bits for a query of this label: position << 1 | relevant, kept for up to a quarter budget."""
        name = ("label keys", layout, int(label))
        if name in self._cache:
            return self._cache[name]
        value = np.arange(self.size, dtype=layout.dtype) << layout.dtype(layout.position_shift)
        value |= self.labels == label
        kept = sum(v.nbytes for k, v in self._cache.items() if k[0] == "label keys")
        if kept + value.nbytes <= self.budget // 4:
            self._cache[name] = value
        return value

    def _gpu_rank_chunk(self, query_codes, query_labels, layout, depth):
        keys = self._gpu_distances(query_codes).long() << layout.dist_shift
        keys |= self._gpu_tensor("positions") << layout.position_shift
        labels = torch.from_numpy(np.asarray(query_labels, dtype=np.int64)).to(self.device)
        keys |= (self._gpu_tensor("labels")[None, :] == labels[:, None]).long()
        keys = torch.sort(keys, dim=1).values
        relevant = (keys & 1).bool()
        rows, cols = relevant.nonzero(as_tuple=True)  # row-major: each row's ranks ascending
        thresholds = torch.arange(1, self.bits + 1, device=self.device, dtype=torch.int64) << layout.dist_shift
        within = torch.searchsorted(keys, thresholds.expand(len(keys), -1).contiguous()).cpu().numpy()
        counts = np.bincount(rows.cpu().numpy(), minlength=len(keys))
        positions = np.split(cols.cpu().numpy().astype(np.int64), np.cumsum(counts)[:-1])
        within = np.concatenate([within.astype(np.int64), np.full((len(keys), 1), self.size)], axis=1)
        return positions, within, relevant[:, :depth].cpu().numpy()

    def evaluate(self, query_codes, query_labels, topk=1000, query_features=None):
        """Every metric of the module docstring for these queries (labels >= 0), as a dict of arrays and means.

        query_features (fp16 [q, D]) re-rank equal Hamming distances by fc7 Euclidean distance.
        """
        if self.labels is None or len(query_codes) == 0:
            raise ValueError("evaluate needs the database labels and at least one query")
        query_labels = np.asarray(query_labels, dtype=np.int64)
        rerank = query_features is not None
        layout = key_layout(self.bits, self.size, euclidean=rerank)
        k = min(topk, self.size)
        depth = max(k, min(CURVE_DEPTH, self.size))
        # BLAS already uses every core for the fc7 products
        threads = 1 if self.on_gpu or rerank else self.threads
        # per query: its relevant ranks (int64, at most N); with --rerank the [q, N] keys and fc7 distances
        bytes_per_item = np.dtype(layout.dtype).itemsize + 34 if rerank else 8

        def work(start, stop):
            features = None if not rerank else query_features[start:stop]
            return _query_metrics(*self._rank_chunk(query_codes[start:stop], query_labels[start:stop], layout, depth,
                                                    features), k)

        with torch_threads(self.threads):  # only the fc7 products of --rerank use torch's threads
            results = self._map(work, self._chunks(len(query_codes), bytes_per_item, threads), threads, "rank")
        per_query = {name: np.concatenate([r[name] for r in results]) for name in results[0] if name != "hits"}
        hits = np.sum([r["hits"] for r in results], axis=0)  # int64 [depth]: exact, so chunking cannot change it
        num_queries = len(query_codes)
        curve = min(CURVE_DEPTH, self.size)
        radius = min(2, self.bits)
        return {
            "map_all": float(np.mean(per_query["ap_all"])), "map_topk": float(np.mean(per_query["ap_k"])), "topk": k,
            "precision_r2": float(np.mean(per_query["precision"][:, radius])),
            "recall_r2": float(np.mean(per_query["recall"][:, radius])),
            "precision_at_k": hits[:curve] / (num_queries * np.arange(1, curve + 1)),
            "pr_precision": per_query["precision"].mean(axis=0), "pr_recall": per_query["recall"].mean(axis=0),
            "per_query": per_query,
        }


def _signs(packed, bits, device):
    """Packed codes uint8 [n, B] -> +-1 fp16 [n, bits] on the device (bit 1 -> +1, bit 0 -> -1)."""
    unpacked = torch.from_numpy(np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)).to(device)
    return unpacked.to(torch.float16).mul_(2).sub_(1)


def _query_metrics(positions, within, top, k):
    """Per-query metrics from where each query's relevant items land in its ranking.

    positions: list of ascending 0-based ranks of the relevant items; within [q, bits + 1]: items within radius r;
    top [q, depth] bool: relevance of the first ranks; k: the depth of AP@k.
    """
    num = len(positions)
    ap_all = np.zeros(num)
    relevant_within = np.empty(within.shape, dtype=np.int64)
    total_relevant = np.array([len(p) for p in positions], dtype=np.int64)
    for i, ranks in enumerate(positions):
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


# ---------------------------------------------------------------------------------------------------------------
# Reading the database for a stage


def labelled(labels):
    """Indices of the rows with a label (>= 0): the ones that take part in a metric."""
    return np.flatnonzero(np.asarray(labels) >= 0)


def ranking_for_metrics(db, bits, args, device, features=False):
    """A Ranking over the labelled database items, or a UserError when there are none."""
    take = labelled(db.labels)
    if len(take) == 0:
        raise UserError(f"no item in {args.database}/db_label.npy has a label (all -1), so there is nothing to "
                        "measure; give the database list labels, or use query.py for unlabelled data")
    return Ranking(db.codes, bits, db.labels, db.features if features else None, take, args.ties, device,
                   getattr(args, "threads", None), getattr(args, "memory_mb", 256))


def labelled_queries(query, args):
    take = labelled(query.labels)
    if len(take) == 0:
        raise UserError(f"no query in {args.database}/query_label.npy has a label (all -1), so there is nothing to "
                        "measure; give data/query/list.txt labels, or use query.py for unlabelled queries")
    return take


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("mAP.py", description=__doc__.split("\n")[0], parents=[common_args_parser(data_root=False)],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=positive_int, required=True, help="code length; must match the database")
    parser.add_argument("--database", default="database", help="folder written by database.py (default: %(default)s)")
    parser.add_argument("--result", default="result", help="folder for the JSON and figures (default: %(default)s)")
    parser.add_argument("--topk", type=positive_int, default=1000, help="k of mAP@k (default: %(default)s)")
    parser.add_argument("--ties", default="shuffle", choices=TIES,
                        help="order of equal distances: a fixed seeded shuffle, or database order (default: %(default)s)")
    parser.add_argument("--rerank", action="store_true",
                        help="order equal Hamming distances by fc7 Euclidean distance (reads the features)")
    parser.add_argument("--threads", type=threads_int, default=os.cpu_count() or 1,
                        help="CPU threads ranking chunks of queries (default: %(default)s, the cores)")
    parser.add_argument("--memory-mb", type=memory_mb, default=256,
                        help="working memory for chunks of queries on the CPU (default: %(default)s)")
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
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: give a positive number of results")
    started = time.perf_counter()
    device = pick_device(args.device)
    db, query, meta = database.load_database(args.database, args.bits, features=args.rerank)
    ranking = ranking_for_metrics(db, args.bits, args, device, features=args.rerank)
    take = labelled_queries(query, args)
    query_features = query.features[take] if args.rerank else None
    metrics = ranking.evaluate(query.codes[take], query.labels[take], args.topk, query_features)
    suffix = "_rerank" if args.rerank else ""
    result = {
        "map_all": metrics["map_all"], "map_topk": metrics["map_topk"], "topk": args.topk, "topk_used": metrics["topk"],
        "precision_r2": metrics["precision_r2"], "recall_r2": metrics["recall_r2"],
        "num_queries": len(take), "num_database": ranking.size,
        "skipped_queries": int(len(query.labels) - len(take)), "skipped_database": int(len(db.labels) - ranking.size),
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
    print(f"{'database':<16}{ranking.size:>10}  (skipped {result['skipped_database']} unlabelled)")
    print(f"wrote {path}, {', '.join(str(f) for f in figures)} in {result['seconds']} s (ties {args.ties})")


if __name__ == "__main__":
    run_main(main)
