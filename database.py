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
                                        "multi"), protocol (from <data-root>/prepare_data.json), img_size, counts,
                                        feature_dim, time, generation (a random id of this write)

The database is multi-label when a line of list.txt or query/list.txt (or the trainlist/testlist line an unlabelled
one falls back to) has two labels or more; relevance is then "shares at least one label" (mAP.py).

This module owns that format: its writer (here) and its reader (load_database), which every later stage uses.
"""
import argparse
import json
import math
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import MyDataset
from net import (autocast, distributed_args_parser, distributed_run, from_main, gather_to_main, load_model,
                 local_main_first, model_from_checkpoint, newest_model, read_model_checkpoint, setup_ranks)
from stage import (UserError, common_args_parser, elapsed, give_user_mode, non_negative_int, positive_int, print_args,
                   refuse_json_constant, run_main, sha256_file, to_json, write_error, write_text)

FORMAT = 1


def get_args_parser():
    parser = argparse.ArgumentParser("database.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(), distributed_args_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=positive_int, required=True, help="code length of the model to use")
    parser.add_argument("--model", default=None, help="checkpoint to encode with (default: newest <bits>bits_*.pt in --model-dir)")
    parser.add_argument("--model-dir", default="model", help="where mytrain.py saved models (default: %(default)s)")
    parser.add_argument("--out", default="database", help="database folder to write (default: %(default)s)")
    parser.add_argument("--result", default="result", help="where bad_images.txt goes (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images (default: %(default)s)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, listed in result/bad_images.txt")
    parser.add_argument("--no-cache", action="store_true", help="stream images instead of using the decoded cache")
    parser.add_argument("--strict-paths", action="store_true",
                        help="refuse list entries outside the list's folder (absolute paths, ..) instead of warning")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def encode(model, model_args, source, device, batch_size):
    """Codes and fc7 for every image of an ImageSource, in list order: (packed uint8 [N, ceil(bits/8)],
    float16 [N, 4096], the entry indices encoded int64 [N], every bad image [(entry index, message)]).

    N is len(source) less the images that streaming (--no-cache --skip-bad) found broken only when decoded; those
    join source.bad in what is returned.
    """
    positions, codes, features, late_bad = encode_share(model, model_args, source, device, batch_size)
    return codes, features, source.keep[positions], sorted(source.bad + late_bad)


@torch.no_grad()
def encode_share(model, model_args, source, device, batch_size, rank=0, world_size=1):
    """(positions int64 [n], codes uint8 [n, ceil(bits/8)], fc7 float16 [n, 4096], bad) for this rank's whole batches.

    positions index source.keep, in increasing order; bad lists the images this pass found broken when decoded. Under torchrun every rank encodes
    whole batches of the single-process run (ImageSource.batches whole=True): on the CPU a float result depends on
    how its batch is composed, so the gathered database is byte-identical to a single process's.
    """
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    codes = np.zeros((len(source), (model_args["bits"] + 7) // 8), dtype=np.uint8)
    features = np.zeros((len(source), 4096), dtype=np.float16)
    encoded = np.zeros(len(source), dtype=bool)
    quiet = {} if rank == 0 else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    bar = MyDataset.tqdm(total=len(source), desc=f"encode {source.name}", unit="img", leave=False, mininterval=1,
                         **quiet)
    batches = source.batches(batch_size, rank=rank, world_size=world_size, whole=True)
    for images, _, positions in batches:
        x = MyDataset.eval_transform(images, model_args["img_size"], model_args["mean"], model_args["std"])
        with autocast(device):
            sigmoid, _, fc7 = model(x)
        rows = positions.numpy()
        codes[rows] = np.packbits((sigmoid.float() > 0.5).cpu().numpy(), axis=1)  # [B, bits] bool -> [B, bytes]
        with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, refused by refuse_non_finite
            features[rows] = fc7.float().cpu().numpy().astype(np.float16)
        encoded[rows] = True
        bar.update(len(rows) * world_size)
    bar.close()
    return np.flatnonzero(encoded), codes[encoded], features[encoded], batches.bad


def encode_part(model, model_args, source, ranks, batch_size):
    """Every rank encodes its batches of one list; rank 0 gets (codes, labels, features, names, bad), others None."""
    keep = source.keep  # positions index it
    *share, late_bad = encode_share(model, model_args, source, ranks.device, batch_size, ranks.rank, ranks.world_size)
    shares = gather_to_main(ranks, (*share, source.bad + late_bad))
    if not ranks.is_main:
        return None
    positions = np.concatenate([positions for positions, _, _, _ in shares])
    order = np.argsort(positions, kind="stable")  # list order, as a single process writes it
    codes = np.concatenate([codes for _, codes, _, _ in shares])[order]
    features = np.concatenate([features for _, _, features, _ in shares])[order]
    entries = keep[positions[order]]
    bad = sorted({index: message for *_, rank_bad in shares for index, message in rank_bad}.items())
    return codes, source.labels[entries], features, [source.entries[i].path for i in entries], bad


def refuse_non_finite(features, model_path, bits):
    """fc7 beyond fp16's range, or a model that diverged: such features would make every distance NaN."""
    if not np.isfinite(features).all():
        raise UserError(f"the model {model_path} gives NaN or infinite fc7 features, so it cannot encode images; "
                        f"train another (python mytrain.py --bits {bits}) or name one with --model")


def encode_new_images(files, folder, meta, model, device, batch_size, skip_bad=False):
    """Images that are not in the database, encoded with the model that built it (query.py and demo.py --image).

    Returns (files kept, packed codes, fp16 fc7, bad). Refused when that model changed since (model_for_database).
    """
    model_path = model_for_database(folder, meta, model)
    network, checkpoint = load_model(model_path, int(meta["bits"]))
    keep, codes, features, bad = encode_files(network, checkpoint["model_args"], files, device, batch_size, skip_bad)
    refuse_non_finite(features, model_path, int(meta["bits"]))
    return [files[i] for i in keep], codes, features, bad


def encode_files(network, model_args, files, device, batch_size, skip_bad=False):
    """Image files encoded with a loaded model (serve.py loads it once): (indices of files kept, codes, fc7, bad)."""
    entries = [MyDataset.Entry(str(path.resolve()), None, n) for n, path in enumerate(files, start=1)]
    # absolute paths: Path(cwd) / path is the path; cache=False writes nothing beside the user's images
    source = MyDataset.ImageSource(Path.cwd(), entries, np.full(len(entries), -1), model_args["img_size"],
                                   "query_images", workers=0 if len(entries) < 512 else 2, skip_bad=skip_bad,
                                   cache=False, device=device)
    codes, features, kept, bad = encode(network, model_args, source, device, batch_size)
    return kept, codes, features, bad


def known_labels(image_folder, strict_paths=False):
    """path -> Entry from trainlist.txt and testlist.txt, for list.txt lines that carry no label."""
    known = {}
    for name in ("trainlist.txt", "testlist.txt"):
        path = Path(image_folder) / name
        if path.is_file():
            known.update({entry.path: entry for entry in MyDataset.read_list(path, need_label=True, strict_paths=strict_paths)})
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

    The old database, if any, is moved aside and removed only after the new one is in place. Each database is a
    folder written once and never changed, a generation: readers pin one (load_database) and never see a mix.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        give_user_mode(tmp, folder=True)
        write_files(tmp, out, parts, {**meta, "generation": uuid.uuid4().hex})
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


def write_files(tmp, out, parts, meta):
    """The files of one database into the folder tmp; a failed write is named as the file under out it was for."""
    writes = []
    for part, (codes, labels, features, names) in parts.items():
        writes += [(f"{part}_binary.npy", codes),
                   (f"{part}_label_multihot.npy", labels.astype(bool)) if labels.ndim == 2
                   else (f"{part}_label.npy", labels.astype(np.int64))]
        if features is not None:  # None: no feature file (bench/search.py's databases, ranked without --rerank)
            writes.append((f"{part}_feature.npy", features))
        writes.append((f"{part}_names.txt", "".join(n + "\n" for n in names)))
    writes.append(("meta.json", to_json(meta, indent=1) + "\n"))
    for name, data in writes:
        try:
            if isinstance(data, str):
                (tmp / name).write_text(data, encoding="utf-8")
            else:
                np.save(tmp / name, data)
        except OSError as err:
            raise write_error(out / name, err) from err


@dataclass
class EncodedImages:
    """One side of the database, as load_split reads it: the codes, labels, names and fc7 of the items or the queries."""
    codes: np.ndarray  # uint8 [N, ceil(bits/8)]
    labels: np.ndarray  # int64 [N], -1 unknown; multi-label: bool [N, C], a row of False unknown
    names: list
    features: np.ndarray | None  # float16 [N, D] (memory-mapped; D = 4096 for AlexNet), None unless asked for


CHANGED = "database changed while reading; run again"
FINITE_CHUNK = 4096  # feature rows checked for NaN/inf at a time: [4096, 4096] fp16, 32 MB


def rebuild_command(folder, bits):
    out = "" if Path(folder).name == "database" and not Path(folder).is_absolute() else f" --out {folder}"
    return f"python database.py --bits {bits}{out}"


class Generation:
    """A database folder pinned by a handle: every file is opened inside the very folder that was opened first.

    database.py swaps a whole new folder in by renames, so the handle keeps reading one generation; when that one
    is removed under us (a file gone, and the name now leads to another folder), the read stops with CHANGED.
    """

    def __init__(self, folder, bits):
        self.folder, self.bits = Path(folder), bits
        self.rebuild = f"rebuild it with: {rebuild_command(folder, bits)}"
        self.fd = self._open_folder()

    def _open_folder(self):
        # A swap leaves the name empty for an instant, with the previous folder aside: wait for it rather than call
        # it missing. The swap may also end between a failed open and the look aside, so the name counts as missing
        # only when it is found missing twice in a row with nothing aside.
        missed = False
        for _ in range(40):
            try:
                return os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                if self._aside():
                    missed = False
                    time.sleep(0.05)
                elif missed:
                    break
                else:
                    missed = True
            except NotADirectoryError:
                raise UserError(f"{self.folder} is not a folder; {self.rebuild}") from None
        aside = self._aside()
        hint = f" (an interrupted run left the previous one in {aside[-1]}: mv it back to {self.folder})" if aside else ""
        raise UserError(f"database folder {self.folder} does not exist{hint}; build it with: "
                        f"{rebuild_command(self.folder, self.bits)}")

    def _aside(self):
        # a database.py killed between its two renames leaves the previous database in .<name>.*.old/previous
        return sorted(self.folder.parent.glob(f".{self.folder.name}.*.old/previous"))

    def replaced(self):
        """True when the folder's name now leads elsewhere than the folder this handle holds."""
        try:
            now, held = os.stat(self.folder), os.fstat(self.fd)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def open(self, name):
        """A binary file object of one file of this generation; only regular files."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            if self.replaced():
                raise UserError(CHANGED) from None
            raise UserError(f"{self.folder / name} is missing; {self.rebuild}") from None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise UserError(f"{self.folder / name} is not a regular file; {self.rebuild}")
        return f

    def close(self):
        os.close(self.fd)

    def corrupt(self, name, why):
        return UserError(f"{self.folder / name} is corrupt ({why}); {self.rebuild}")


def read_npy(generation, name, dtype, ndim, mmap=False):
    """An array from a .npy file, its header checked (dtype, dims, size on disk) before any data is read.

    The header cannot make us allocate more than the file holds; object arrays (pickles) are never read.
    """
    with generation.open(name) as f:
        try:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, found = header(f)
        except Exception as err:
            raise generation.corrupt(name, f"not a .npy file: {type(err).__name__}") from None
        if found != np.dtype(dtype) or len(shape) != ndim or fortran_order:
            raise UserError(f"{generation.folder / name} holds {found} {shape}, expected {np.dtype(dtype)} with "
                            f"{ndim} dims; {generation.rebuild}")
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
        if offset + math.prod(shape) * found.itemsize != size:
            raise generation.corrupt(name, f"{size - offset} bytes of data for shape {shape}: truncated or padded")
        if math.prod(shape) == 0:
            return np.empty(shape, dtype)
        array = np.memmap(f, dtype=found, mode="r", offset=offset, shape=shape)
    return array if mmap else np.array(array)


def read_names(generation, name):
    with generation.open(name) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise generation.corrupt(name, f"not UTF-8 at byte {err.start}") from None
    if text and not text.endswith("\n"):
        raise generation.corrupt(name, "its last line is cut off")
    return text.split("\n")[:-1]  # one name a line: '\n' alone separates them, as written


def check_meta(meta, path, rebuild):
    """The fields the readers use, type-checked: a hand-edited or crafted meta.json is refused, not trusted."""
    def refuse(why):
        return UserError(f"{path} is corrupt ({why}); {rebuild}")

    if not isinstance(meta, dict):
        raise refuse("not a JSON object")
    bits = meta.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 65536:
        raise refuse(f"bits must be a positive integer, got {bits!r:.40}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise refuse("labels must be a list of strings")
    if meta.get("label_kind", "single") not in ("single", "multi"):
        raise refuse(f"label_kind must be 'single' or 'multi', got {meta.get('label_kind')!r:.40}")
    for key in ("model", "model_abspath", "model_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise refuse(f"{key} must be a string")
    for key in ("num_database", "num_queries", "feature_dim"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise refuse(f"{key} must be a non-negative integer")
    return meta


def read_meta(folder, generation=None):
    """meta.json of a database folder, checked (check_meta); read through generation when one is pinned."""
    path = Path(folder) / "meta.json"
    bits = generation.bits if generation is not None else "BITS"
    rebuild = f"rebuild with: {rebuild_command(folder, bits)}"
    if generation is None and not path.is_file():
        raise UserError(f"{path} is missing: {folder} is not a database; build one with: {rebuild_command(folder, bits)}")
    try:
        if generation is not None:
            with generation.open("meta.json") as f:
                text = f.read().decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        meta = json.loads(text, parse_constant=refuse_json_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, NaN, absurd nesting
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:80]
        raise UserError(f"{path} is corrupt (not valid JSON: {detail}); {rebuild}") from None
    return check_meta(meta, path, rebuild)


def check_finite(generation, name, features):
    for start in range(0, len(features), FINITE_CHUNK):
        if not np.isfinite(features[start:start + FINITE_CHUNK]).all():
            raise generation.corrupt(name, "holds NaN or infinite features")


def load_labels(generation, part, label_kind):
    """int64 [N] (-1 unknown) for a single-label database; bool [N, C] for a multi-label one (uint8 is read too)."""
    if label_kind == "single":
        return read_npy(generation, f"{part}_label.npy", np.int64, 1)
    try:
        return read_npy(generation, f"{part}_label_multihot.npy", np.bool_, 2)
    except UserError:
        return read_npy(generation, f"{part}_label_multihot.npy", np.uint8, 2).astype(bool)


def load_split(generation, part, meta, features=False):
    """Read one part ('db' or 'query') and check that its files agree with each other and with meta."""
    bits, folder = generation.bits, generation.folder
    codes = read_npy(generation, f"{part}_binary.npy", np.uint8, 2)
    labels = load_labels(generation, part, meta.get("label_kind", "single"))
    names = read_names(generation, f"{part}_names.txt")
    feats = read_npy(generation, f"{part}_feature.npy", np.float16, 2, mmap=True) if features else None
    if codes.shape[1] != (bits + 7) // 8:
        raise UserError(f"{folder / f'{part}_binary.npy'} holds {codes.shape[1] * 8}-bit rows, not {bits} bits; "
                        f"rebuild with: {rebuild_command(folder, bits)}")
    lengths = {"codes": len(codes), "labels": len(labels), "names": len(names)}
    if feats is not None:
        lengths["features"] = len(feats)
    if meta.get("num_database" if part == "db" else "num_queries") is not None:
        lengths["meta.json"] = meta["num_database" if part == "db" else "num_queries"]
    if len(set(lengths.values())) != 1:
        raise UserError(f"{folder}: {part} files disagree in length ({lengths}); a write was interrupted or a file "
                        f"was replaced; rebuild with: {rebuild_command(folder, bits)}")
    if labels.ndim == 2 and labels.shape[1] != len(meta["labels"]):
        raise generation.corrupt(f"{part}_label_multihot.npy", f"{labels.shape[1]} label columns, meta.json has "
                                 f"{len(meta['labels'])} labels")
    if labels.ndim == 1 and len(labels) and (labels.min() < -1 or labels.max() >= len(meta["labels"])):
        raise generation.corrupt(f"{part}_label.npy", f"labels outside -1..{len(meta['labels']) - 1}")
    if feats is not None:
        width = meta.get("feature_dim", feats.shape[1])
        if feats.shape[1] != width or feats.shape[1] == 0:
            raise generation.corrupt(f"{part}_feature.npy", f"{feats.shape[1]} features a row, meta.json says {width}")
        check_finite(generation, f"{part}_feature.npy", feats)
    return EncodedImages(codes, labels, names, feats)


def load_database(folder, bits, features=False):
    """(db EncodedImages, query EncodedImages, meta): what mAP.py, search.py, query.py and demo.py read.

    Features are memory-mapped and only read when asked for (features=True). All files come from one generation
    of the folder, or the read stops with CHANGED (database.py swapped a new one in meanwhile).
    """
    generation = Generation(folder, bits)
    try:
        meta = read_meta(folder, generation)
        if meta["bits"] != bits:
            raise UserError(f"{folder} holds {meta['bits']}-bit codes but --bits {bits} was given; use --bits "
                            f"{meta['bits']} or rebuild with: python database.py --bits {bits}")
        db, query = (load_split(generation, part, meta, features) for part in ("db", "query"))
        if features and db.features.shape[1] != query.features.shape[1]:
            raise generation.corrupt("query_feature.npy", f"{query.features.shape[1]} features a row, "
                                     f"db_feature.npy has {db.features.shape[1]}")
        return db, query, meta
    except UserError:
        if generation.replaced():  # whatever looked wrong, it was the folder changing under us
            raise UserError(CHANGED) from None
        raise
    finally:
        generation.close()


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


def retrieval_sources(args, net_args, ranks):
    """({'db': ImageSource of data/image/list.txt, 'query': of data/query/list.txt}, label names by index, label_kind).

    Under torchrun local rank 0 of each machine builds the decoded caches while the others wait, then they read them.
    """
    image_folder, query_folder = Path(args.data_root) / "image", Path(args.data_root) / "query"
    db_entries = MyDataset.read_list(image_folder / "list.txt", need_label=False, strict_paths=args.strict_paths)
    query_entries = MyDataset.read_list(query_folder / "list.txt", need_label=False, strict_paths=args.strict_paths)
    db_labels, query_labels, every, label_kind = retrieval_labels(db_entries, query_entries, net_args["classes"],
                                                                  known_labels(image_folder, args.strict_paths))
    # every header in both lists is checked before either list is decoded or its first batch encoded
    lists = (("db", image_folder, db_entries, db_labels), ("query", query_folder, query_entries, query_labels))
    checked = {part: MyDataset.check_images(folder, entries, args.skip_bad) for part, folder, entries, _ in lists}
    sources = {}
    with local_main_first(ranks):
        for part, folder, entries, labels in lists:
            sources[part] = MyDataset.ImageSource(folder, entries, labels, net_args["img_size"], f"{part}_list",
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
        return path, read_model_checkpoint(path, args.bits)

    # rank 0 reads the model and sends it to every rank: the model folder need not be shared between machines
    model_path, checkpoint = from_main(ranks, read_model)
    net_args = checkpoint["model_args"]
    model = model_from_checkpoint(checkpoint)
    sources, every, label_kind = retrieval_sources(args, net_args, ranks)
    parts, bad = {}, []
    for part, source in sources.items():
        encoded = encode_part(model, net_args, source, ranks, args.batch_size)
        if ranks.is_main:
            refuse_non_finite(encoded[2], model_path, args.bits)
            parts[part] = encoded[:4]
            bad += [message for _, message in encoded[4]]
    if not ranks.is_main:
        return
    if bad:
        write_text(Path(args.result) / "bad_images.txt", "".join(message + "\n" for message in bad))
        print(f"skipped {len(bad)} unreadable image(s), listed in {Path(args.result) / 'bad_images.txt'}")
    meta = {
        "format": FORMAT, "bits": net_args["bits"], "model": str(model_path), "model_abspath": str(model_path.resolve()),
        "model_sha256": sha256_file(model_path),
        "labels": every, "label_kind": label_kind, "protocol": data_protocol(args.data_root),
        "num_classes_trained": len(net_args["classes"]), "img_size": net_args["img_size"],
        "mean": net_args["mean"], "std": net_args["std"], "recipe": net_args["recipe"],
        "feature_dim": int(parts["db"][2].shape[1]),
        "num_database": len(parts["db"][0]), "num_queries": len(parts["query"][0]), "skipped_bad": len(bad),
        "device": str(ranks.device), "world_size": ranks.world_size, "seconds": elapsed(started),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
    }
    if len(parts["db"][0]) == 0:  # never an empty database over a good one
        raise UserError(f"no database image was encoded (all {len(sources['db'].entries)} left out as unreadable); "
                        f"{args.out} was left as it was")
    write_database(args.out, parts, meta)
    print(json.dumps({"database": args.out, "num_database": meta["num_database"], "num_queries": meta["num_queries"],
                      "bits": meta["bits"], "seconds": elapsed(started)}))


if __name__ == "__main__":
    run_main(main)
