"""Encode the database and the queries into packed binary codes, labels and fc7 features.

    python database.py --bits 48                      # the newest 48-bit model in model/
    python database.py --bits 48 --model model/48bits_91.37.pt --out database
    torchrun --nproc-per-node 8 database.py --bits 48   # whole batches dealt to 8 GPUs; rank 0 writes

Writes under --out (default database/), all at once: the files go to a temporary folder beside it that is
swapped in at the end, so a failed or killed run leaves the previous database intact.
    db_binary.npy, query_binary.npy     uint8 [N, ceil(bits/8)]   sigmoid > 0.5, np.packbits(axis=1), padding 0
    db_label.npy, query_label.npy       int64 [N]                 label index, -1 where unknown (single-label data)
    db_label_multihot.npy, query_label_multihot.npy
                                        bool [N, C]               multi-label data instead: True where the item
                                                                  has label c (meta.json "labels"); a row of False
                                                                  is unknown
    db_feature.npy, query_feature.npy   float16 [N, 4096]         fc7
    db_names.txt, query_names.txt       the image paths as in the list files, one a line, same order
    meta.json                           bits, model path and sha256, labels by index, label_kind ("single" or
                                        "multi"), protocol (from <data-root>/prepare_data.json), img_size, counts, time

The database is multi-label when a line of list.txt or query/list.txt (or the trainlist/testlist line an unlabelled
one falls back to) has two labels or more; relevance is then "shares at least one label" (mAP.py).

This module owns that format: its writer (here) and its reader (load_database), which every later stage uses.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import MyDataset
from net import (autocast, build_model, distributed_args_parser, distributed_run, from_main, gather_to_main, load_model,
                 local_main_first, newest_model, setup_ranks)
from stage import UserError, common_args_parser, elapsed, print_args, run_main, sha256_file, write_text

FORMAT = 1
FILES = ("binary.npy", "label.npy", "feature.npy", "names.txt")


def get_args_parser():
    parser = argparse.ArgumentParser("database.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(), distributed_args_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, required=True, help="code length of the model to use")
    parser.add_argument("--model", default=None, help="checkpoint to encode with (default: newest <bits>bits_*.pt in --model-dir)")
    parser.add_argument("--model-dir", default="model", help="where mytrain.py saved models (default: %(default)s)")
    parser.add_argument("--out", default="database", help="database folder to write (default: %(default)s)")
    parser.add_argument("--result", default="result", help="where bad_images.txt goes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images (default: %(default)s)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, listed in result/bad_images.txt")
    parser.add_argument("--no-cache", action="store_true", help="stream images instead of using the decoded cache")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def encode(model, checkpoint, source, device, batch_size):
    """Codes and fc7 for every image of an ImageSource: (packed uint8 [N, ceil(bits/8)], float16 [N, 4096]).

    N is len(source) (bad images left out), in list order. Streaming (--no-cache --skip-bad) can find an image
    broken only when decoded: its row is dropped here, as the source drops it from source.keep.
    """
    positions, codes, features = encode_share(model, checkpoint, source, device, batch_size)
    return codes, features


@torch.no_grad()
def encode_share(model, checkpoint, source, device, batch_size, rank=0, world_size=1):
    """(positions int64 [n], codes uint8 [n, ceil(bits/8)], fc7 float16 [n, 4096]) for this rank's whole batches.

    positions index source.keep as it was before encoding, in increasing order. Under torchrun every rank encodes
    whole batches of the single-process run (ImageSource.batches whole=True): on the CPU a float result depends on
    how its batch is composed, so the gathered database is byte-identical to a single process's.
    """
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    codes = np.zeros((len(source), (checkpoint["bits"] + 7) // 8), dtype=np.uint8)
    features = np.zeros((len(source), 4096), dtype=np.float16)
    encoded = np.zeros(len(source), dtype=bool)
    bar = MyDataset.tqdm(total=len(source), desc=f"encode {source.name}", unit="img", leave=False, mininterval=1,
                         disable=rank != 0)
    for images, _, positions in source.batches(batch_size, rank=rank, world_size=world_size, whole=True):
        x = MyDataset.eval_transform(images, checkpoint["img_size"], checkpoint["mean"], checkpoint["std"])
        with autocast(device):
            sigmoid, _, fc7 = model(x)
        rows = positions.numpy()
        codes[rows] = np.packbits((sigmoid.float() > 0.5).cpu().numpy(), axis=1)  # [B, bits] bool -> [B, bytes]
        features[rows] = fc7.float().cpu().numpy().astype(np.float16)
        encoded[rows] = True
        bar.update(len(rows) * world_size)
    bar.close()
    return np.flatnonzero(encoded), codes[encoded], features[encoded]


def encode_part(model, checkpoint, source, ranks, batch_size):
    """Every rank encodes its batches of one list; rank 0 gets (codes, labels, features, names, bad), others None."""
    keep = source.keep.copy()  # positions index it; streaming may drop late-broken images from source.keep
    share = encode_share(model, checkpoint, source, ranks.device, batch_size, ranks.rank, ranks.world_size)
    shares = gather_to_main(ranks, (*share, source.bad))
    if not ranks.is_main:
        return None
    positions = np.concatenate([positions for positions, _, _, _ in shares])
    order = np.argsort(positions, kind="stable")  # list order, as a single process writes it
    codes = np.concatenate([codes for _, codes, _, _ in shares])[order]
    features = np.concatenate([features for _, _, features, _ in shares])[order]
    entries = keep[positions[order]]
    bad = sorted({index: message for *_, rank_bad in shares for index, message in rank_bad}.items())
    return codes, source.labels[entries], features, [source.entries[i].path for i in entries], bad


def encode_new_images(files, folder, meta, model, device, batch_size, skip_bad=False):
    """Images that are not in the database, encoded with the model that built it (query.py and demo.py --image).

    Returns (files kept, packed codes, fp16 fc7, bad). Refused when that model changed since (model_for_database).
    """
    model_path = model_for_database(folder, meta, model)
    network, checkpoint = load_model(model_path, int(meta["bits"]))
    keep, codes, features, bad = encode_files(network, checkpoint, files, device, batch_size, skip_bad)
    return [files[i] for i in keep], codes, features, bad


def encode_files(network, checkpoint, files, device, batch_size, skip_bad=False):
    """Image files encoded with a loaded model (serve.py loads it once): (indices of files kept, codes, fc7, bad)."""
    entries = [MyDataset.Entry(str(path.resolve()), None, n) for n, path in enumerate(files, start=1)]
    # absolute paths: Path(cwd) / path is the path; cache=False writes nothing beside the user's images
    source = MyDataset.ImageSource(Path.cwd(), entries, np.full(len(entries), -1), checkpoint["img_size"],
                                   "query_images", workers=0 if len(entries) < 512 else 2, skip_bad=skip_bad,
                                   cache=False, device=device)
    codes, features = encode(network, checkpoint, source, device, batch_size)
    return source.keep, codes, features, source.bad


def known_labels(image_folder):
    """path -> Entry from trainlist.txt and testlist.txt, for list.txt lines that carry no label."""
    known = {}
    for name in ("trainlist.txt", "testlist.txt"):
        path = Path(image_folder) / name
        if path.is_file():
            known.update({entry.path: entry for entry in MyDataset.read_list(path, need_label=True)})
    return known


def retrieval_labels(db_entries, query_entries, classes, known):
    """(db labels, query labels, label names by index, label_kind) for the two lists.

    Single-label: int64 [N], -1 unknown. Multi-label (some line, or the known line it falls back to, has two labels
    or more): bool [N, C]. Queries take labels only from their own list; unseen ones extend the database's index.
    """
    fallback = [known[entry.path] for entry in db_entries if entry.label is None and entry.path in known]
    if not MyDataset.is_multi_label(db_entries, query_entries, fallback):
        db_labels, every = MyDataset.retrieval_labels(db_entries, classes, {p: e.label for p, e in known.items()})
        query_labels, every = MyDataset.retrieval_labels(query_entries, every, {})
        return db_labels, query_labels, every, "single"
    db_labels, every = MyDataset.retrieval_multi_hot(db_entries, classes, {p: e.labels for p, e in known.items()})
    query_labels, every = MyDataset.retrieval_multi_hot(query_entries, every, {})
    # the database's label columns grow to take labels only the queries have
    db_labels = np.pad(db_labels, ((0, 0), (0, len(every) - db_labels.shape[1])))
    return db_labels, query_labels, every, "multi"


def data_protocol(data_root):
    """The benchmark protocol prepare_data.py recorded for this data (queries, k of mAP@k, relevance), else None."""
    path = Path(data_root) / "prepare_data.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("protocol")
    except (OSError, ValueError, AttributeError):
        return None  # no record, or not one prepare_data.py wrote: the data follows no named protocol


# ---------------------------------------------------------------------------------------------------------------
# The format: writer and reader


def write_database(out, parts, meta):
    """parts: {'db': (codes, labels, features, names), 'query': ...}; written to a temporary folder, then swapped in.

    features None: no feature file (bench/search.py's databases, ranked without --rerank).

    The old database, if any, is moved aside and removed only after the new one is in place.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for part, (codes, labels, features, names) in parts.items():
            np.save(tmp / f"{part}_binary.npy", codes)
            if labels.ndim == 2:
                np.save(tmp / f"{part}_label_multihot.npy", labels.astype(bool))
            else:
                np.save(tmp / f"{part}_label.npy", labels.astype(np.int64))
            if features is not None:
                np.save(tmp / f"{part}_feature.npy", features)
            (tmp / f"{part}_names.txt").write_text("".join(name + "\n" for name in names), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")  # an instant away from the new one; still on disk until the swap
            try:
                os.replace(tmp, out)
            except BaseException:  # the swap itself failed: put the previous database back where it was
                os.replace(old / "previous", out)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Split:
    """One side of the database: the encoded database items or the queries."""
    codes: np.ndarray  # uint8 [N, ceil(bits/8)]
    labels: np.ndarray  # int64 [N], -1 unknown; multi-label: bool [N, C], a row of False unknown
    names: list
    features: np.ndarray | None  # float16 [N, 4096] (memory-mapped), None unless asked for


def _load_array(path, dtype, ndim, mmap=False):
    if not path.is_file():
        raise UserError(f"{path} is missing; rebuild the database with: python database.py --bits BITS")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:
        raise UserError(f"{path} is corrupt ({type(err).__name__}); rebuild the database with: "
                        "python database.py --bits BITS") from err
    if array.dtype != dtype or array.ndim != ndim:
        raise UserError(f"{path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} with {ndim} dims; "
                        "rebuild the database with: python database.py --bits BITS")
    return array


def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: {folder} is not a database; build one with: python database.py --bits BITS")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        int(meta["bits"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is corrupt ({type(err).__name__}); rebuild with: python database.py --bits BITS") from err
    return meta


def load_labels(folder, part, label_kind):
    """int64 [N] (-1 unknown) for a single-label database; bool [N, C] for a multi-label one (uint8 is read too)."""
    if label_kind == "single":
        return _load_array(folder / f"{part}_label.npy", np.int64, 1)
    path = folder / f"{part}_label_multihot.npy"
    try:
        return _load_array(path, np.bool_, 2)
    except UserError:
        return _load_array(path, np.uint8, 2).astype(bool)


def load_split(folder, part, bits, features=False, label_kind="single"):
    """Read one part ('db' or 'query') and check that its files agree with each other and with bits."""
    folder = Path(folder)
    codes = _load_array(folder / f"{part}_binary.npy", np.uint8, 2)
    labels = load_labels(folder, part, label_kind)
    names_path = folder / f"{part}_names.txt"
    if not names_path.is_file():
        raise UserError(f"{names_path} is missing; rebuild the database with: python database.py --bits {bits}")
    names = names_path.read_text(encoding="utf-8").splitlines()
    feats = _load_array(folder / f"{part}_feature.npy", np.float16, 2, mmap=True) if features else None
    if codes.shape[1] != (bits + 7) // 8:
        raise UserError(f"{folder / f'{part}_binary.npy'} holds {codes.shape[1] * 8}-bit rows, not {bits} bits; "
                        f"rebuild with: python database.py --bits {bits}")
    lengths = {"codes": len(codes), "labels": len(labels), "names": len(names)}
    if feats is not None:
        lengths["features"] = len(feats)
    if len(set(lengths.values())) != 1:
        raise UserError(f"{folder}: {part} files disagree in length ({lengths}); a write was interrupted or a file "
                        f"was replaced; rebuild with: python database.py --bits {bits}")
    return Split(codes, labels, names, feats)


def load_database(folder, bits, features=False):
    """(db Split, query Split, meta): what mAP.py, search.py, query.py and demo.py read.

    Features are memory-mapped and only read when asked for (features=True).
    """
    folder = Path(folder)
    if not folder.is_dir():
        # a database.py killed between its two renames leaves the previous database in .<name>.*.old/previous
        aside = sorted(folder.parent.glob(f".{folder.name}.*.old/previous"))
        hint = f" (an interrupted run left the previous one in {aside[-1]}: mv it back to {folder})" if aside else ""
        raise UserError(f"database folder {folder} does not exist{hint}; build it with: python database.py --bits {bits}")
    meta = read_meta(folder)
    if int(meta["bits"]) != bits:
        raise UserError(f"{folder} holds {meta['bits']}-bit codes but --bits {bits} was given; use --bits {meta['bits']} "
                        f"or rebuild with: python database.py --bits {bits}")
    label_kind = meta.get("label_kind", "single")  # databases written before multi-label data are single-label
    if label_kind not in ("single", "multi"):
        raise UserError(f"{folder / 'meta.json'} says label_kind {label_kind!r}, not 'single' or 'multi'; "
                        f"rebuild with: python database.py --bits {bits}")
    db = load_split(folder, "db", bits, features, label_kind)
    query = load_split(folder, "query", bits, features, label_kind)
    if label_kind == "multi" and db.labels.shape[1] != query.labels.shape[1]:
        raise UserError(f"{folder}: db and query multi-hot labels have {db.labels.shape[1]} and "
                        f"{query.labels.shape[1]} columns; rebuild with: python database.py --bits {bits}")
    return db, query, meta


def label_text(meta, label, class_names=None):
    """A database or query label as text, None when unknown: its token in meta.json's labels, or the class name
    that token stands for in class_names (token -> name, from class_names()).

    label: an index into meta.json's labels (-1 unknown), or a multi-hot row (the tokens joined by ',').
    """
    tokens, class_names = meta.get("labels") or [], class_names or {}
    label = np.asarray(label)
    indices = np.flatnonzero(label) if label.ndim == 1 else [int(label)]
    known = [str(tokens[i]) for i in indices if 0 <= i < len(tokens)]
    return ",".join(class_names.get(token, token) for token in known) or None


def query_answer(name, label, found, db, meta):
    """One query's answer as query.json and serve.py's API give it: r', candidates, each result's distances.

    found: one of mAP.coarse_to_fine's dicts (rows, hamming, euclidean, radius, candidates).
    """
    return {"query": name, "label": label_text(meta, label), "radius": found["radius"],
            "candidates": found["candidates"],
            "results": [{"name": db.names[row], "index": int(row), "label": label_text(meta, db.labels[row]),
                         "hamming": int(h), "euclidean": round(float(e), 4)}
                        for row, h, e in zip(found["rows"], found["hamming"], found["euclidean"])]}


def class_names(data_root):
    """token -> class name from prepare_data.py's record (data/prepare_data.json); {} where there is none."""
    try:
        classes = json.loads((Path(data_root) / "prepare_data.json").read_text(encoding="utf-8"))["classes"]
        return {str(token): str(name) for token, name in classes.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def model_for_database(folder, meta, model=None):
    """The model that made this database, refused when its file changed since or another one is named.

    Codes from one model are meaningless against another's: a query by image must use the very same weights.
    """
    recorded = meta.get("model")
    rebuild = f"python database.py --bits {meta['bits']}" + (f" --model {model}" if model else "") + f" --out {folder}"
    # the path as given to database.py (relative to where it ran: a tree moved as a whole keeps working), then absolute
    candidates = [Path(p) for p in (recorded, meta.get("model_abspath")) if p]
    found = next((p for p in candidates if p.is_file()), None)
    if model is not None and recorded is not None and Path(model).resolve() != (found or Path(recorded)).resolve():
        raise UserError(f"--model {model} is not the model that built {folder} ({recorded}); rebuild it with: {rebuild}")
    path = Path(model) if model is not None else found
    if not recorded or path is None or not path.is_file():
        raise UserError(f"the model that built {folder} ({recorded}) is gone; rebuild the database with: {rebuild}")
    if meta.get("model_sha256") != sha256_file(path):
        raise UserError(f"{path} changed since it built {folder} (sha256 differs); rebuild it with: {rebuild}")
    return path


# ---------------------------------------------------------------------------------------------------------------


def main():
    args = get_args_parser().parse_args()
    ranks = setup_ranks(args.device, args.dist_timeout)
    with distributed_run(ranks):
        build_database(args, ranks)


def retrieval_sources(args, checkpoint, ranks):
    """({'db': ImageSource of data/image/list.txt, 'query': of data/query/list.txt}, label names by index, label_kind).

    Under torchrun local rank 0 of each machine builds the decoded caches while the others wait, then they read them.
    """
    image_folder, query_folder = Path(args.data_root) / "image", Path(args.data_root) / "query"
    db_entries = MyDataset.read_list(image_folder / "list.txt", need_label=False)
    query_entries = MyDataset.read_list(query_folder / "list.txt", need_label=False)
    db_labels, query_labels, every, label_kind = retrieval_labels(db_entries, query_entries, checkpoint["classes"],
                                                                  known_labels(image_folder))
    # every header in both lists is checked before either list is decoded or its first batch encoded
    lists = (("db", image_folder, db_entries, db_labels), ("query", query_folder, query_entries, query_labels))
    checked = {part: MyDataset.check_images(folder, entries, args.skip_bad) for part, folder, entries, _ in lists}
    sources = {}
    with local_main_first(ranks):
        for part, folder, entries, labels in lists:
            sources[part] = MyDataset.ImageSource(folder, entries, labels, checkpoint["img_size"], f"{part}_list",
                                                  args.workers, args.skip_bad, not args.no_cache, ranks.device,
                                                  checked=checked[part])
    return sources, every, label_kind


def build_database(args, ranks):
    """Encode both lists on every rank; rank 0 gathers the rows and alone writes the database."""
    if ranks.is_main:
        print_args(args)
    started = time.perf_counter()

    def read_model():
        path = Path(args.model) if args.model else newest_model(args.model_dir, args.bits)
        return path, load_model(path, args.bits)[1]

    # rank 0 reads the model and sends it to every rank: the model folder need not be shared between machines
    model_path, checkpoint = from_main(ranks, read_model)
    model = build_model(checkpoint).eval()
    sources, every, label_kind = retrieval_sources(args, checkpoint, ranks)
    parts, bad = {}, []
    for part, source in sources.items():
        encoded = encode_part(model, checkpoint, source, ranks, args.batch_size)
        if ranks.is_main:
            parts[part] = encoded[:4]
            bad += [message for _, message in encoded[4]]
    if not ranks.is_main:
        return
    if bad:
        write_text(Path(args.result) / "bad_images.txt", "".join(message + "\n" for message in bad))
        print(f"skipped {len(bad)} unreadable image(s), listed in {Path(args.result) / 'bad_images.txt'}")
    meta = {
        "format": FORMAT, "bits": checkpoint["bits"], "model": str(model_path), "model_abspath": str(model_path.resolve()),
        "model_sha256": sha256_file(model_path),
        "labels": every, "label_kind": label_kind, "protocol": data_protocol(args.data_root), "num_classes_trained": len(checkpoint["classes"]), "img_size": checkpoint["img_size"],
        "mean": checkpoint["mean"], "std": checkpoint["std"], "recipe": checkpoint.get("recipe"),
        "num_database": len(parts["db"][0]), "num_queries": len(parts["query"][0]), "skipped_bad": len(bad),
        "device": str(ranks.device), "world_size": ranks.world_size, "seconds": elapsed(started),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
    }
    write_database(args.out, parts, meta)
    print(json.dumps({"database": args.out, "num_database": meta["num_database"], "num_queries": meta["num_queries"],
                      "bits": meta["bits"], "seconds": elapsed(started)}))


if __name__ == "__main__":
    run_main(main)
