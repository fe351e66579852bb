"""mAP.py's ranking and every metric against slow, obviously correct per-query references written here.

The references rank with Python's sorted() on (Hamming distance, [fc7 distance], rank in the seeded shuffle) and
count precision and recall with plain loops. Codes have few distinct values (many ties); fc7 features are small
integers, so Euclidean distances are exact and tie as well.
"""
import math

import numpy as np
import pytest
import torch

import mAP
from fake_database import make_prototypes, make_split


def make_data(bits, seed=0, num_db=180, num_query=25, classes=3, unlabelled_db=0, unlabelled_query=0, dim=8):
    rng = np.random.default_rng(seed)
    prototypes = make_prototypes(rng, classes, bits, per_class=2)
    db = make_split(rng, num_db, prototypes, unlabelled_db, dim)
    query = make_split(rng, num_query, prototypes, unlabelled_query, dim)
    return db, query


# ---------------------------------------------------------------------------------------------------------------
# References


def bit_lists(packed, bits):
    return [list(row) for row in np.unpackbits(packed, axis=1, count=bits)]


def hamming(a, b):
    return sum(x != y for x, y in zip(a, b))


def tie_rank(count, ties):
    """rank[j] = where item j (0-based among the items taking part) stands in the tie order."""
    order = list(range(count)) if ties == "index" else list(np.random.default_rng(0).permutation(count))
    rank = [0] * count
    for position, item in enumerate(order):
        rank[item] = position
    return rank


def has_label(label):
    """A label takes part: >= 0, or a multi-hot row with at least one 1."""
    return any(int(x) != 0 for x in label) if np.ndim(label) else label >= 0


def shares(a, b):
    """The relevance rule, slowly: the same label, or a class both multi-hot rows hold."""
    if np.ndim(a):
        return any(int(x) != 0 and int(y) != 0 for x, y in zip(a, b))
    return a >= 0 and a == b


def reference_rankings(db, query, bits, ties="shuffle", rerank=False):
    """For each labelled query: (its label, the labelled database items in ranked order as (index, distance))."""
    db_codes, db_labels, db_features = db
    query_codes, query_labels, query_features = query
    items = [j for j in range(len(db_labels)) if has_label(db_labels[j])]
    rank = tie_rank(len(items), ties)
    db_bits = bit_lists(db_codes, bits)
    out = []
    for i, query_bits in enumerate(bit_lists(query_codes, bits)):
        if not has_label(query_labels[i]):
            continue
        distance = {j: hamming(query_bits, db_bits[j]) for j in items}

        def key(n):
            j = items[n]
            euclid = sum((float(a) - float(b)) ** 2 for a, b in zip(query_features[i], db_features[j])) if rerank else 0
            return (distance[j], euclid, rank[n])

        ranked = sorted(range(len(items)), key=key)
        out.append((query_labels[i], [(items[n], distance[items[n]]) for n in ranked]))
    return out


def reference_metrics(db, query, bits, topk, ties="shuffle", rerank=False):
    db_labels = db[1]
    ap_all, ap_k, curves, precision, recall = [], [], [], [], []
    for label, ranked in reference_rankings(db, query, bits, ties, rerank):
        relevant = [shares(label, db_labels[j]) for j, _ in ranked]
        total = sum(relevant)
        hits, gain, gain_k, hits_k = 0, 0.0, 0.0, 0
        curve = []
        for n, rel in enumerate(relevant, start=1):
            if rel:
                hits += 1
                gain += hits / n
                if n <= topk:
                    gain_k += hits / n
            if n <= topk:
                hits_k = hits
            if n <= 1000:
                curve.append(hits / n)
        ap_all.append(gain / total if total else 0.0)
        ap_k.append(gain_k / hits_k if hits_k else 0.0)
        curves.append(curve)
        p_row, r_row = [], []
        for radius in range(bits + 1):
            inside = [shares(label, db_labels[j]) for j, d in ranked if d <= radius]
            p_row.append(sum(inside) / len(inside) if inside else 0.0)
            r_row.append(sum(inside) / total if total else 0.0)
        precision.append(p_row)
        recall.append(r_row)
    return {"ap_all": np.array(ap_all), "ap_k": np.array(ap_k), "precision_at_k": np.mean(curves, axis=0),
            "precision": np.array(precision), "recall": np.array(recall)}


def items_for(db, bits, ties="shuffle", **kwargs):
    codes, labels, features = db
    return mAP.prepare_items(codes, bits, labels, features, mAP.labelled(labels), ties, **kwargs)


def evaluate(db, query, bits, topk, ties="shuffle", rerank=False, **kwargs):
    take = mAP.labelled(query[1])
    features = query[2][take] if rerank else None
    return mAP.evaluate(items_for(db, bits, ties, **kwargs), query[0][take], query[1][take], topk, features)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,ties,rerank", [(12, "shuffle", False), (16, "index", False), (12, "shuffle", True),
                                              (70, "shuffle", False)])
def test_every_metric_matches_the_reference(bits, ties, rerank):
    db, query = make_data(bits, seed=bits, unlabelled_db=9, unlabelled_query=4)
    topk = 40
    got = evaluate(db, query, bits, topk, ties, rerank, memory_mb=1)
    want = reference_metrics(db, query, bits, topk, ties, rerank)
    np.testing.assert_allclose(got["per_query"]["ap_all"], want["ap_all"], rtol=1e-12)
    np.testing.assert_allclose(got["per_query"]["ap_k"], want["ap_k"], rtol=1e-12)
    np.testing.assert_allclose(got["precision_at_k"], want["precision_at_k"], rtol=1e-12)
    np.testing.assert_allclose(got["per_query"]["precision"], want["precision"], rtol=1e-12)
    np.testing.assert_allclose(got["per_query"]["recall"], want["recall"], rtol=1e-12)
    assert got["map_all"] == pytest.approx(want["ap_all"].mean(), rel=1e-12)
    assert got["map_topk"] == pytest.approx(want["ap_k"].mean(), rel=1e-12)
    assert got["precision_r2"] == pytest.approx(want["precision"][:, 2].mean(), rel=1e-12)
    assert got["recall_r2"] == pytest.approx(want["recall"][:, 2].mean(), rel=1e-12)
    np.testing.assert_allclose(got["pr_precision"], want["precision"].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["pr_recall"], want["recall"].mean(axis=0), rtol=1e-12)
    assert len(got["precision_at_k"]) == min(1000, len(mAP.labelled(db[1])))


def test_the_data_has_many_ties():
    db, query = make_data(12)
    assert len(np.unique(db[0], axis=0)) < len(db[0]) / 2
    distances = mAP.hamming_distances(items_for(db, 12), query[0])
    assert max(np.bincount(row).max() for row in distances) > 20


def test_topk_deeper_than_the_database_and_queries_without_relevant_items():
    db, query = make_data(12, num_db=30)
    labels = query[1].copy()
    labels[:5] = 7  # a class the database does not hold: AP 0, recall 0
    query = (query[0], labels, query[2])
    got = evaluate(db, query, 12, topk=5000)
    want = reference_metrics(db, query, 12, 5000)
    assert got["topk"] == 30 and len(got["precision_at_k"]) == 30
    assert np.all(got["per_query"]["ap_all"][:5] == 0) and np.all(got["per_query"]["recall"][:5] == 0)
    np.testing.assert_allclose(got["per_query"]["ap_all"], want["ap_all"], rtol=1e-12)
    np.testing.assert_allclose(got["per_query"]["ap_k"], want["ap_all"], rtol=1e-12)  # k >= N: AP@k = AP


def test_chunks_and_threads_do_not_change_any_figure():
    db, query = make_data(16, seed=3)
    one = evaluate(db, query, 16, 50, memory_mb=1, threads=2)  # chunks of one query on two threads
    whole = evaluate(db, query, 16, 50, memory_mb=512, threads=1)
    for name in ("map_all", "map_topk", "precision_r2", "recall_r2"):
        assert one[name] == whole[name]
    for name in ("precision_at_k", "pr_precision", "pr_recall"):
        assert np.array_equal(one[name], whole[name])
    small = items_for(db, 16, memory_mb=1, threads=2)
    big = items_for(db, 16, memory_mb=512, threads=1)
    for a, b in zip(mAP.topk(small, query[0], 17), mAP.topk(big, query[0], 17)):
        assert np.array_equal(a, b)


def test_ties_index_follows_database_order_and_shuffle_does_not():
    """A class-sorted database of identical codes: database order ranks a class first, the shuffle does not."""
    bits, per_class = 12, 40
    labels = np.repeat(np.arange(3), per_class)
    codes = np.zeros((len(labels), 2), dtype=np.uint8)
    query_codes, query_labels = np.zeros((1, 2), dtype=np.uint8), np.array([0])
    by_index = mAP.evaluate(mAP.prepare_items(codes, bits, labels, ties="index"), query_codes, query_labels, 40)
    shuffled = mAP.evaluate(mAP.prepare_items(codes, bits, labels, ties="shuffle"), query_codes, query_labels, 40)
    assert by_index["map_all"] == 1.0 and by_index["map_topk"] == 1.0
    assert shuffled["map_all"] < 0.6
    rows, _ = mAP.topk(mAP.prepare_items(codes, bits, labels, ties="shuffle"), query_codes, 5)
    assert list(rows[0]) == list(np.random.default_rng(0).permutation(len(labels))[:5])


@pytest.mark.parametrize("bits,ties", [(12, "shuffle"), (16, "index"), (70, "shuffle")])
def test_topk_is_the_head_of_the_reference_ranking(bits, ties):
    db, query = make_data(bits, seed=5, unlabelled_db=7)
    items = items_for(db, bits, ties)
    rows, distances = mAP.topk(items, query[0], 23)
    for i, (_, ranked) in enumerate(reference_rankings(db, (query[0], np.zeros(len(query[1]), int), query[2]),
                                                      bits, ties)):
        assert list(rows[i]) == [j for j, _ in ranked[:23]]
        assert list(distances[i]) == [d for _, d in ranked[:23]]


def test_distances_of_long_codes_count_every_word():
    rng = np.random.default_rng(0)
    for bits in (7, 64, 65, 300):
        a = rng.integers(0, 2, size=(5, bits), dtype=np.uint8)
        b = rng.integers(0, 2, size=(9, bits), dtype=np.uint8)
        got = mAP.hamming_distances(mAP.prepare_items(np.packbits(b, axis=1), bits, ties="index"), np.packbits(a, axis=1))
        assert np.array_equal(got, (a[:, None, :] != b[None, :, :]).sum(axis=2))


def test_distances_in_blocks_equal_one_pass(monkeypatch):
    monkeypatch.setattr(mAP, "DISTANCE_BLOCK", 7)  # 7 items a block: many blocks and a ragged last one
    rng = np.random.default_rng(1)
    for bits in (48, 130):
        a = rng.integers(0, 2, size=(4, bits), dtype=np.uint8)
        b = rng.integers(0, 2, size=(60, bits), dtype=np.uint8)
        items = mAP.prepare_items(np.packbits(b, axis=1), bits, labels=rng.integers(0, 3, 60), ties="index")
        assert np.array_equal(mAP.hamming_distances(items, np.packbits(a, axis=1)), (a[:, None, :] != b[None, :, :]).sum(axis=2))
    db, query = make_data(16, seed=8)
    blocked = evaluate(db, query, 16, 30)
    monkeypatch.setattr(mAP, "DISTANCE_BLOCK", 65536)
    assert evaluate(db, query, 16, 30)["map_all"] == blocked["map_all"]


def test_smallest_radius_whatever_the_guess():
    rng = np.random.default_rng(2)
    for trial in range(200):
        bits = int(rng.integers(1, 70))
        distances = rng.integers(0, bits + 1, size=int(rng.integers(1, 300_000 if trial < 3 else 400)))
        if trial % 3 == 1:
            distances = np.sort(distances)[::-1]  # a sample from the far end guesses badly
        distances = distances.astype(np.uint8)
        count = int(rng.integers(1, len(distances) + 1))
        want = next(r for r in range(bits + 1) if np.count_nonzero(distances <= r) >= count)
        assert mAP.smallest_radius(distances, count, bits) == want


def reference_coarse_to_fine(db, query_bits, query_feature, bits, radius, topk, grow=True):
    codes, _, features = db
    count = len(codes)
    rank = tie_rank(count, "shuffle")
    distance = [hamming(query_bits, row) for row in bit_lists(codes, bits)]
    used = radius
    if grow:
        while sum(d <= used for d in distance) < min(topk, count):
            used += 1
    euclid = [sum((float(a) - float(b)) ** 2 for a, b in zip(query_feature, features[j])) for j in range(count)]
    candidates = sorted((j for j in range(count) if distance[j] <= used), key=lambda j: (euclid[j], rank[j]))
    return used, candidates[:topk], [distance[j] for j in candidates[:topk]], [math.sqrt(euclid[j])
                                                                            for j in candidates[:topk]]


@pytest.mark.parametrize("radius,topk,grow", [(0, 10, True), (2, 10, True), (1, 15, False), (0, 500, True)])
def test_coarse_to_fine_matches_the_reference(radius, topk, grow):
    bits = 16
    db, query = make_data(bits, seed=11)
    items = mAP.prepare_items(db[0], bits, db[1], db[2], memory_mb=1)
    got = mAP.coarse_to_fine(items, query[0], query[2], radius, topk, grow)
    for i, query_bits in enumerate(bit_lists(query[0], bits)):
        used, rows, hamming_distances, euclid = reference_coarse_to_fine(db, query_bits, query[2][i], bits, radius,
                                                                         topk, grow)
        assert got[i]["radius"] == used
        assert list(got[i]["rows"]) == rows
        assert list(got[i]["hamming"]) == hamming_distances
        np.testing.assert_allclose(got[i]["euclidean"], euclid, rtol=1e-6)
    if grow:
        assert all(len(r["rows"]) == min(topk, len(db[0])) for r in got)


@pytest.mark.parametrize("multi_label", [False, True])
def test_radius_metrics_match_the_reference(multi_label):
    bits, depth = 12, 10
    db, query = make_data(bits, seed=2, unlabelled_db=6)
    if multi_label:
        db, query = multi_hot_data(db, query, classes=5, seed=2)
    take = mAP.labelled(query[1])
    radii = list(range(0, 7))
    items = items_for(db, bits)
    got = mAP.radius_study(items, query[0][take], query[1][take], query[2][take], radii, depth)
    items = [j for j in range(len(db[1])) if has_label(db[1][j])]
    rank = tie_rank(len(items), "shuffle")
    db_bits = bit_lists(db[0], bits)
    for row, i in enumerate(take):
        query_bits = bit_lists(query[0][i:i + 1], bits)[0]
        for column, radius in enumerate(radii):
            inside = [n for n, j in enumerate(items) if hamming(query_bits, db_bits[j]) <= radius]
            inside.sort(key=lambda n: (sum((float(a) - float(b)) ** 2 for a, b in zip(query[2][i], db[2][items[n]])),
                                       rank[n]))
            relevant = [shares(query[1][i], db[1][items[n]]) for n in inside]
            assert got["candidates"][row, column] == len(inside)
            want_precision = sum(relevant[:depth]) / min(depth, len(relevant)) if relevant else 0.0
            assert got["precision"][row, column] == pytest.approx(want_precision, rel=1e-12)
            hits, gain = 0, 0.0
            for n, rel in enumerate(relevant, start=1):
                if rel:
                    hits += 1
                    gain += hits / n
            assert got["ap"][row, column] == pytest.approx(gain / hits if hits else 0.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Multi-label relevance: an item is relevant when it shares at least one label with the query


def multi_hot_data(db, query, classes, seed, dtype=bool, orphans=3):
    """make_data's codes with multi-hot labels [n, classes]: an item holds its single label's class and each other
    class but the last with probability min(0.3, 4 / classes); unlabelled items hold none. No database item holds the last class, and
    the first `orphans` queries hold only it: they have no relevant item."""
    rng = np.random.default_rng(seed)

    def hot(labels, orphaned):
        rows = (rng.random((len(labels), classes)) < min(0.3, 4 / classes)) & (labels >= 0)[:, None]
        rows[:, -1] = False
        rows[labels >= 0, labels[labels >= 0]] = True
        rows[:orphaned] = False
        rows[:orphaned, -1] = True
        return rows.astype(dtype)

    return (db[0], hot(db[1], 0), db[2]), (query[0], hot(query[1], orphans), query[2])


@pytest.mark.parametrize("bits,ties,rerank,classes,dtype", [(12, "shuffle", False, 5, bool), (16, "index", False, 5, np.uint8),
                                                            (12, "shuffle", True, 5, bool), (70, "shuffle", False, 70, np.uint8)])
def test_multi_label_metrics_match_the_reference(bits, ties, rerank, classes, dtype):
    db, query = make_data(bits, seed=bits + 1, classes=min(classes - 1, 4), unlabelled_db=9, unlabelled_query=4)
    db, query = multi_hot_data(db, query, classes, seed=bits, dtype=dtype)
    topk = 40
    got = evaluate(db, query, bits, topk, ties, rerank, memory_mb=1)
    want = reference_metrics(db, query, bits, topk, ties, rerank)
    assert np.all(got["per_query"]["ap_all"][:3] == 0) and np.all(got["per_query"]["recall"][:3] == 0)
    assert np.count_nonzero(got["per_query"]["ap_all"]) > len(want["ap_all"]) - 4
    for name in ("ap_all", "ap_k", "precision", "recall"):
        np.testing.assert_allclose(got["per_query"][name], want[name], rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["precision_at_k"], want["precision_at_k"], rtol=1e-12, atol=0)
    assert got["map_all"] == pytest.approx(want["ap_all"].mean(), rel=1e-12)
    assert got["map_topk"] == pytest.approx(want["ap_k"].mean(), rel=1e-12)
    assert got["precision_r2"] == pytest.approx(want["precision"][:, 2].mean(), rel=1e-12)
    assert got["recall_r2"] == pytest.approx(want["recall"][:, 2].mean(), rel=1e-12)
    np.testing.assert_allclose(got["pr_precision"], want["precision"].mean(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["pr_recall"], want["recall"].mean(axis=0), rtol=1e-12, atol=0)


def test_one_hot_labels_give_the_single_label_figures_exactly():
    db, query = make_data(16, seed=9, unlabelled_db=5, unlabelled_query=3)
    one_hot = [(split[0], (split[1][:, None] == np.arange(3)).astype(np.uint8), split[2]) for split in (db, query)]
    single, multi = evaluate(db, query, 16, 30, rerank=True), evaluate(*one_hot, 16, 30, rerank=True)
    for name in ("map_all", "map_topk", "precision_r2", "recall_r2", "precision_at_k", "pr_precision", "pr_recall"):
        assert np.array_equal(single[name], multi[name])


def test_relevance_is_sharing_a_label():
    rng = np.random.default_rng(3)
    single_query, single_db = rng.integers(-1, 4, 20), rng.integers(-1, 4, 50)
    want = [[shares(a, b) for b in single_db] for a in single_query]
    assert np.array_equal(mAP.relevance(single_query, single_db), want)
    for classes in (3, 64, 65, 130):  # one word of labels, and several
        query_hot, db_hot = rng.random((20, classes)) < 2 / classes, rng.random((50, classes)) < 2 / classes
        want = [[shares(a, b) for b in db_hot] for a in query_hot]
        assert np.array_equal(mAP.relevance(query_hot, db_hot.astype(np.uint8)), want)
    with pytest.raises(ValueError):
        mAP.relevance(single_query, db_hot)


def test_float_keys_order_like_the_distances():
    values = np.array([3.5, -0.0, 0.0, -1e-7, 1e-30, 2.0, np.float32(1e30)], dtype=np.float32)
    keys = mAP.float_keys(values)
    assert keys[1] == keys[2] == keys[3] == 0
    assert list(np.argsort(keys, kind="stable")) == list(np.argsort(np.maximum(values, 0), kind="stable"))


def assert_same_rankings(cpu, gpu, query):
    assert np.array_equal(mAP.hamming_distances(cpu, query[0]), mAP.hamming_distances(gpu, query[0]))
    for a, b in zip(mAP.topk(cpu, query[0], 31), mAP.topk(gpu, query[0], 31)):
        assert np.array_equal(a, b)
    take = mAP.labelled(query[1])
    want = mAP.evaluate(cpu, query[0][take], query[1][take], 40)
    got = mAP.evaluate(gpu, query[0][take], query[1][take], 40)
    for name in ("ap_all", "ap_k", "precision", "recall"):
        assert np.array_equal(got["per_query"][name], want["per_query"][name])
    assert np.array_equal(got["precision_at_k"], want["precision_at_k"])


@pytest.mark.parametrize("bits", [12, 70])
def test_the_cuda_code_on_cpu_tensors_gives_the_numpy_results(bits):
    """The GPU path's torch code (+-1 products, int64 keys, torch.sort, searchsorted), run here on the CPU."""
    db, query = make_data(bits, seed=4, unlabelled_db=5)
    torch_path = items_for(db, bits)
    torch_path.on_gpu = True  # the device stays the CPU: only the code path changes
    assert_same_rankings(items_for(db, bits, memory_mb=1), torch_path, query)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("bits", [12, 70])
def test_cuda_gives_the_cpu_results(bits):
    db, query = make_data(bits, seed=4, unlabelled_db=5)
    cpu = items_for(db, bits, memory_mb=1)
    gpu = items_for(db, bits, device=torch.device("cuda"))
    assert gpu.on_gpu
    assert_same_rankings(cpu, gpu, query)
