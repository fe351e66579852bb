"""Encode the database and the queries into packed binary codes, labels and fc7 features.

    python database.py --bits 48                      # the newest 48-bit model in model/
    python database.py --bits 48 --model model/48bits_91.37.pt --out database

Writes under --out (default database/), all at once: the files go to a temporary folder beside it that is
swapped in at the end, so a failed or killed run leaves the previous database intact.
    db_binary.npy, query_binary.npy     uint8 [N, ceil(bits/8)]   sigmoid > 0.5, np.packbits(axis=1), padding 0
    db_label.npy, query_label.npy       int64 [N]                 label index, -1 where unknown
    db_feature.npy, query_feature.npy   float16 [N, 4096]         fc7
    db_names.txt, query_names.txt       the image paths as in the list files, one a line, same order
    meta.json                           bits, model path and sha256, labels by index, img_size, counts, time

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
from net import autocast, load_model, newest_model, pick_device
from stage import UserError, common_args_parser, elapsed, print_args, run_main, sha256_file, write_text

FORMAT = 1


def get_args_parser():
    parser = argparse.ArgumentParser("database.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser()], formatter_class=argparse.RawDescriptionHelpFormatter)
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


@torch.no_grad()
def encode(model, model_args, source, device, batch_size):
    """Codes and fc7 for every image of an ImageSource, in list order: (packed uint8 [N, ceil(bits/8)],
    float16 [N, 4096], the entry indices encoded int64 [N], every bad image [(entry index, message)]).

    N is len(source) less the images that streaming (--no-cache --skip-bad) found broken only when decoded; those
    join source.bad in what is returned.
    """
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    codes = np.zeros((len(source), (model_args["bits"] + 7) // 8), dtype=np.uint8)
    features = np.zeros((len(source), 4096), dtype=np.float16)
    encoded = np.zeros(len(source), dtype=bool)
    bar = MyDataset.tqdm(total=len(source), desc=f"encode {source.name}", unit="img", leave=False, mininterval=1)
    batches = source.batches(batch_size)
    for images, _, positions in batches:
        x = MyDataset.eval_transform(images, model_args["img_size"], model_args["mean"], model_args["std"])
        with autocast(device):
            sigmoid, _, fc7 = model(x)
        rows = positions.numpy()
        codes[rows] = np.packbits((sigmoid.float() > 0.5).cpu().numpy(), axis=1)  # [B, bits] bool -> [B, bytes]
        features[rows] = fc7.float().cpu().numpy().astype(np.float16)
        encoded[rows] = True
        bar.update(len(rows))
    bar.close()
    return codes[encoded], features[encoded], source.keep[encoded], sorted(source.bad + batches.bad)


def encode_new_images(files, folder, meta, model, device, batch_size, skip_bad=False):
    """Images that are not in the database, encoded with the model that built it (query.py and demo.py --image).

    Returns (files kept, packed codes, fp16 fc7, bad). Refused when that model changed since (model_for_database).
    """
    model_path = model_for_database(folder, meta, model)
    network, checkpoint = load_model(model_path, int(meta["bits"]))
    net_args = checkpoint["model_args"]
    entries = [MyDataset.Entry(str(path.resolve()), None, n) for n, path in enumerate(files, start=1)]
    # absolute paths: Path(cwd) / path is the path; cache=False writes nothing beside the user's images
    source = MyDataset.ImageSource(Path.cwd(), entries, np.full(len(entries), -1), net_args["img_size"],
                                   "query_images", workers=0 if len(entries) < 512 else 2, skip_bad=skip_bad,
                                   cache=False, device=device)
    codes, features, kept, bad = encode(network, net_args, source, device, batch_size)
    return [files[i] for i in kept], codes, features, bad


def known_labels(image_folder):
    """path -> label from trainlist.txt and testlist.txt, for list.txt lines that carry no label."""
    known = {}
    for name in ("trainlist.txt", "testlist.txt"):
        path = Path(image_folder) / name
        if path.is_file():
            known.update({entry.path: entry.label for entry in MyDataset.read_list(path, need_label=True)})
    return known


# ---------------------------------------------------------------------------------------------------------------
# The format: writer and reader


def write_database(out, parts, meta):
    """parts: {'db': (codes, labels, features, names), 'query': ...}; written to a temporary folder, then swapped in.

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
            np.save(tmp / f"{part}_label.npy", labels.astype(np.int64))
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
class EncodedImages:
    """One side of the database, as load_split reads it: the codes, labels, names and fc7 of the items or the queries."""
    codes: np.ndarray  # uint8 [N, ceil(bits/8)]
    labels: np.ndarray  # int64 [N], -1 unknown
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


def load_split(folder, part, bits, features=False):
    """Read one part ('db' or 'query') and check that its files agree with each other and with bits."""
    folder = Path(folder)
    codes = _load_array(folder / f"{part}_binary.npy", np.uint8, 2)
    labels = _load_array(folder / f"{part}_label.npy", np.int64, 1)
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
    return EncodedImages(codes, labels, names, feats)


def load_database(folder, bits, features=False):
    """(db EncodedImages, query EncodedImages, meta): what mAP.py, search.py, query.py and demo.py read.

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
    return load_split(folder, "db", bits, features), load_split(folder, "query", bits, features), meta


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
    print_args(args)
    started = time.perf_counter()
    device = pick_device(args.device)
    model_path = Path(args.model) if args.model else newest_model(args.model_dir, args.bits)
    model, checkpoint = load_model(model_path, args.bits)
    net_args = checkpoint["model_args"]
    image_folder, query_folder = Path(args.data_root) / "image", Path(args.data_root) / "query"
    db_entries = MyDataset.read_list(image_folder / "list.txt", need_label=False)
    query_entries = MyDataset.read_list(query_folder / "list.txt", need_label=False)
    known = known_labels(image_folder)
    db_labels, every = MyDataset.retrieval_labels(db_entries, net_args["classes"], known)
    # queries take labels only from their own list; unseen ones extend the same index after the database's
    query_labels, every = MyDataset.retrieval_labels(query_entries, every, {})
    # every header in both lists is checked before either list is decoded or its first batch encoded
    lists = (("db", image_folder, db_entries, db_labels), ("query", query_folder, query_entries, query_labels))
    checked = {part: MyDataset.check_images(folder, entries, args.skip_bad) for part, folder, entries, _ in lists}
    sources = {}
    for part, folder, entries, labels in lists:
        sources[part] = MyDataset.ImageSource(folder, entries, labels, net_args["img_size"], f"{part}_list",
                                              args.workers, args.skip_bad, not args.no_cache, device,
                                              checked=checked[part])
    parts, bad = {}, []
    for part, source in sources.items():
        codes, features, kept, part_bad = encode(model, net_args, source, device, args.batch_size)
        names = [source.entries[i].path for i in kept]
        parts[part] = (codes, source.labels[kept], features, names)
        bad += [message for _, message in part_bad]
    if bad:
        write_text(Path(args.result) / "bad_images.txt", "".join(message + "\n" for message in bad))
        print(f"skipped {len(bad)} unreadable image(s), listed in {Path(args.result) / 'bad_images.txt'}")
    meta = {
        "format": FORMAT, "bits": net_args["bits"], "model": str(model_path), "model_abspath": str(model_path.resolve()),
        "model_sha256": sha256_file(model_path),
        "labels": every, "num_classes_trained": len(net_args["classes"]), "img_size": net_args["img_size"],
        "mean": net_args["mean"], "std": net_args["std"], "recipe": net_args["recipe"],
        "num_database": len(parts["db"][0]), "num_queries": len(parts["query"][0]), "skipped_bad": len(bad),
        "device": str(device), "seconds": elapsed(started), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
    }
    write_database(args.out, parts, meta)
    print(json.dumps({"database": args.out, "num_database": meta["num_database"], "num_queries": meta["num_queries"],
                      "bits": meta["bits"], "seconds": elapsed(started)}))


if __name__ == "__main__":
    run_main(main)
