"""A small generated database folder in database.py's format, for the tests of mAP.py, search.py, query.py, demo.py.

Codes have class structure and many ties: each class has a few prototype codes and items copy one with a bit or two
flipped, so few distinct codes exist. Features are small integers stored as fp16, so every Euclidean distance is an
exact integer in float32 whatever the summation order: ties in fc7 distance are exact and tests can rely on them.
"""
import json
from pathlib import Path

import numpy as np


def make_prototypes(rng, num_classes, bits, per_class=3):
    """0/1 prototype codes uint8 [classes, per_class, bits]: database and queries draw on the same ones."""
    return rng.integers(0, 2, size=(num_classes, per_class, bits), dtype=np.uint8)


def make_split(rng, count, prototypes, unlabelled, dim, flip=0.3):
    """(packed codes, labels, fp16 features) of count items: a prototype of the item's class with each bit flipped
    with probability 2 * flip / bits; `unlabelled` random items get label -1."""
    num_classes, per_class, bits = prototypes.shape
    labels = rng.integers(0, num_classes, size=count).astype(np.int64)
    codes = prototypes[labels, rng.integers(0, per_class, size=count)]
    codes = codes ^ (rng.random((count, bits)) < flip * 2 / bits).astype(np.uint8)
    labels[rng.choice(count, size=unlabelled, replace=False)] = -1
    features = rng.integers(0, 3, size=(count, dim)).astype(np.float16)
    return np.packbits(codes, axis=1), labels, features


def write_fake_database(folder, bits=16, num_db=300, num_query=40, num_classes=4, unlabelled_db=0,
                        unlabelled_query=0, dim=32, seed=0, model=None, model_sha256=None, per_class=3):
    """Write db_*/query_* arrays, names and meta.json to folder; return {part: (packed codes, labels, features)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = make_prototypes(rng, num_classes, bits, per_class)
    parts = {"db": make_split(rng, num_db, prototypes, unlabelled_db, dim),
             "query": make_split(rng, num_query, prototypes, unlabelled_query, dim)}
    for part, (codes, labels, features) in parts.items():
        np.save(folder / f"{part}_binary.npy", codes)
        np.save(folder / f"{part}_label.npy", labels)
        np.save(folder / f"{part}_feature.npy", features)
        names = [f"{part}/{i:05d}.png" for i in range(len(codes))]
        (folder / f"{part}_names.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    meta = {"format": 1, "bits": bits, "model": model, "model_sha256": model_sha256,
            "labels": [f"class{i}" for i in range(num_classes)], "img_size": 64, "num_database": num_db,
            "num_queries": num_query}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return parts
