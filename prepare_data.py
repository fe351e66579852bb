"""Make a data set in the layout every stage reads: data/image (training, test, database) and data/query.

    python prepare_data.py fashion-mnist                    # 60,000 training/database images, 10,000 test/queries
    python prepare_data.py fashion-mnist --limit-per-class 600 --limit-test-per-class 50    # the README's quick mode
    python prepare_data.py cifar10                          # downloads through torchvision into --download-dir
    python prepare_data.py cifar10 --source ~/cifar-10-batches-py     # the official python batches, already here
    python prepare_data.py folder PATH --test-fraction 0.2 --seed 0   # PATH/<class>/**/<image>, label = <class>
    python prepare_data.py cifar10 --protocol dsh --seed 0   # 1,000 queries, 5,000 training, 59,000 database
    python prepare_data.py nus-wide --source ~/NUS-WIDE --lists ~/DeepHash-pytorch/data/nuswide_21
    python prepare_data.py coco --source ~/coco --lists ~/HashNet/pytorch/data/coco
    python prepare_data.py imagenet100 --source ~/imagenet --lists ~/HashNet/pytorch/data/imagenet

Writes under --data-root (default data/):
    image/train/<label>/<name>          the training images: the training split and the database
    image/test/<label>/<name>           the test images: accuracy during training
    image/trainlist.txt, testlist.txt   <path relative to image/> <label>
    image/list.txt                      the database: the same lines as trainlist.txt
    query/test/<label>/<name>           the queries: copies of the test images
    query/list.txt                      <path relative to query/> <label>: the same lines as testlist.txt
    prepare_data.json                   the arguments, the classes (label -> name), the counts and the protocol

The database is the training split only (the protocols below set their own, never holding a query), so a query
never finds itself in it. Fashion-MNIST and CIFAR-10 (--protocol dlbhc) keep their official train/test splits
and use the class index 0..9 as the label (the names are printed and stored in prepare_data.json). `folder` (and
cifar10 with --source a folder of classes) labels each image with its class folder's name and splits every class
by a seeded --test-fraction, unless the folder holds train/ and test/ folders of classes, whose split it keeps. --limit-per-class and --limit-test-per-class keep the first images of each class
in the order of the source (for folder, of the sorted file names), so a smaller set is a subset of a larger one.

Benchmark protocols (README, Protocols). Each records `protocol` in prepare_data.json (name, queries, training
images, database, classes, relevance, topk: the k of mAP@k, null for the whole ranking); database.py carries it to
meta.json and mAP.py takes its k as the default --topk. cifar10 --protocol dsh pools the 60,000 images and draws,
per class and seeded by --seed, 100 queries and 500 training images; the database is every image but the queries.
nus-wide (NUS-WIDE-21), coco and imagenet100 read the standard database.txt, train.txt and test.txt (the queries)
of HashNet / DeepHash-pytorch from --lists: one line per image, its path then one 0/1 column per class. Paths are
found under --source, relative (images/...) or absolute on another machine (the leading folders that do not exist
here are dropped). The images stay where they are: the lists written name them by absolute path, nothing is
copied. NUS-WIDE and MS-COCO are multi-label (relevant = shares at least one label); ImageNet-100's rows have one
label each. The counts are checked against the protocol; a missing image or an off count is an error naming the list.
cifar10 --protocol dlbhc (the default) records its protocol when the counts are the official ones.

Fashion-MNIST is read from the idx files in --source (default /usr/share/datasets/fashion-mnist, installed by the
Debian package dataset-fashion-mnist; gzipped or not); only when they are absent does torchvision download them.

Fashion-MNIST takes about 20 s on 2 CPU cores (80,000 PNG files: the test images are written twice, to image/
and query/). Running the same command again gives the same files: images already there with the same content are
left as they are (their mtimes too, so MyDataset's decoded cache stays valid). Anything already there that differs
(a list file, an image) is refused unless --force; --force replaces the list files and images of the same names and
leaves every other file in place.
"""
import argparse
import codecs
import errno
import gzip
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import stat
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from MyDataset import IMAGE_SUFFIXES, read_list, sort_labels
from stage import (UserError, common_args_parser, elapsed, finite_float, positive_int, print_args, run_main, seed_int,
                   write_json, write_text)

DATASETS = ("fashion-mnist", "cifar10", "folder", "nus-wide", "coco", "imagenet100")
BENCHMARKS = ("nus-wide", "coco", "imagenet100")  # read the standard list files beside a local copy of the images
# What papers report, checked against what a run writes. topk None: mAP over the whole ranking. The last three are
# HashNet's (Cao et al., ICCV 2017) and DeepHash-pytorch's lists: train is drawn from the database, queries are
# not in it.
PROTOCOLS = {
    "cifar10-dlbhc": {"queries": 10000, "train": 50000, "database": 50000, "classes": 10, "relevance": "same label",
                      "topk": 1000},
    "cifar10-dsh": {"queries": 1000, "train": 5000, "database": 59000, "classes": 10, "relevance": "same label",
                    "topk": None},
    "nus-wide": {"queries": 2100, "train": 10500, "database": 193734, "classes": 21,
                 "relevance": "shares at least one label", "topk": 5000},
    "coco": {"queries": 5000, "train": 10000, "database": 117218, "classes": 80,
             "relevance": "shares at least one label", "topk": 5000},
    "imagenet100": {"queries": 5000, "train": 10000, "database": 128503, "classes": 100, "relevance": "same label",
                    "topk": 1000},
}
LIST_FILES = {"database": "database.txt", "train": "train.txt", "queries": "test.txt"}  # as HashNet names them
DSH_PER_CLASS = {"queries": 100, "train": 500}
FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {  # key -> idx file name without .gz
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{n}" for n in range(1, 6))
CHUNK = 256  # images per task handed to a worker process


def get_args_parser():
    parser = argparse.ArgumentParser("prepare_data.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(device=False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("dataset", choices=DATASETS, help="what to prepare")
    parser.add_argument("path", nargs="?", default=None, help="folder mode: the folder of class subfolders")
    parser.add_argument("--source", default=None,
                        help="where the data already is: fashion-mnist, the folder of the four idx files "
                             f"(default: {FASHION_MNIST_SOURCE}); cifar10, the cifar-10-batches-py folder or a "
                             "folder of class subfolders (default: download); nus-wide, coco, imagenet100, the "
                             "local copy of the images the lists' paths start from (required)")
    parser.add_argument("--protocol", default="dlbhc", choices=("dlbhc", "dsh"),
                        help="cifar10: dlbhc, the official 50,000/10,000 split (database = training); dsh, 1,000 "
                             "queries (100 a class), 5,000 training images (500 a class) and the other 59,000 as "
                             "the database, drawn with --seed (default: %(default)s)")
    parser.add_argument("--lists", default=None,
                        help="nus-wide, coco, imagenet100: the folder of database.txt, train.txt and test.txt "
                             "(default: --source)")
    parser.add_argument("--download-dir", default=None,
                        help="where torchvision downloads to when --source lacks the data "
                             "(default: <data-root>/download)")
    parser.add_argument("--test-fraction", type=finite_float, default=0.2,
                        help="folder mode: share of each class that becomes test images and queries "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="folder mode and cifar10 --protocol dsh: seed of the "
                                                           "split (default: %(default)s)")
    parser.add_argument("--limit-per-class", type=positive_int, default=None,
                        help="keep the first N training images of each class (default: all)")
    parser.add_argument("--limit-test-per-class", type=positive_int, default=None,
                        help="keep the first M test images (queries) of each class (default: all)")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes encoding and writing images (default: %(default)s)")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="folder mode: also copy images that symlinks lead to outside the folder (default: skip them)")
    parser.add_argument("--force", action="store_true",
                        help="replace list files and images that differ from what this command writes")
    return parser


def check_args(args):
    if args.dataset == "folder" and args.path is None:
        raise UserError("folder mode needs the folder: python prepare_data.py folder PATH")
    if args.dataset != "folder" and args.path is not None:
        raise UserError(f"{args.dataset} takes no PATH ({args.path}); give a local copy with --source {args.path}")
    if args.dataset == "folder" and args.source is not None:
        raise UserError("folder mode reads PATH; --source is for fashion-mnist and cifar10")
    check_protocol_args(args)
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    for flag, value in (("--limit-per-class", args.limit_per_class),
                        ("--limit-test-per-class", args.limit_test_per_class)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}; leave it out to keep every image")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")


# ---------------------------------------------------------------------------------------------------------------
# What a data set is made of


@dataclass
class LabelledImages:
    """The labelled images of one split (train or test): where each goes, its label token, where its pixels come from."""
    names: list  # paths relative to data/image (and data/query for the test split)
    labels: list  # label tokens (str)
    pixels: np.ndarray | None = None  # uint8 [N, H, W] or [N, H, W, 3], written as PNG
    files: list | None = None  # image files copied byte for byte

    def __len__(self):
        return len(self.names)

    def subset(self, rows):
        return LabelledImages([self.names[i] for i in rows], [self.labels[i] for i in rows],
                     None if self.pixels is None else self.pixels[rows],
                     None if self.files is None else [self.files[i] for i in rows])

    def concat(self, other):
        """This split followed by other (both in-memory pixels, or both files)."""
        pixels = None if self.pixels is None else np.concatenate([self.pixels, other.pixels])
        files = None if self.files is None else self.files + other.files
        return LabelledImages(self.names + other.names, self.labels + other.labels, pixels, files)


@dataclass
class Prepared:
    classes: dict  # label token -> class name
    train: LabelledImages
    test: LabelledImages
    source: str  # where the data was read from
    database: LabelledImages | None = None  # None: the database is the training split
    in_place: bool = False  # names are the source images' absolute paths: lists point at them, nothing is copied
    skipped: dict | None = None  # folder mode: files not taken, by reason


def array_split(split_name, pixels, labels):
    """A LabelledImages of in-memory images; names keep each image's index in its official split: train/3/00042.png."""
    tokens = [str(int(label)) for label in labels]
    names = [f"{split_name}/{token}/{index:05d}.png" for index, token in enumerate(tokens)]
    return LabelledImages(names, tokens, pixels=pixels)


def first_per_class(labels, limit):
    """Rows of the first `limit` images of each label, in their order: a deterministic subset."""
    if limit is None:
        return list(range(len(labels)))
    taken, rows = Counter(), []
    for row, label in enumerate(labels):
        if taken[label] < limit:
            taken[label] += 1
            rows.append(row)
    return rows


def download_dir(args):
    return Path(args.download_dir) if args.download_dir else Path(args.data_root) / "download"


def first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:120]}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files


def find_idx_files(folder):
    """{key: path} where folder (or torchvision's folder/FashionMNIST/raw) holds all four idx files, else None."""
    for base in (Path(folder), Path(folder) / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FASHION_MNIST_FILES.items():
            for name in (stem + ".gz", stem):
                if (base / name).is_file():
                    found[key] = base / name
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    return None


def read_idx(path, ndim):
    """An idx file of unsigned bytes as a uint8 array: [N, 28, 28] images (ndim 3) or [N] labels (ndim 1)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path} cannot be read ({first_line(err)}); replace it with a good copy") from err
    # header: two zero bytes, 0x08 (unsigned byte), the number of dimensions, then each dimension as big-endian uint32
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UserError(f"{path} is not an idx file of bytes with {ndim} dimension(s); replace it with a good copy")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(data) != expected:
        raise UserError(f"{path} holds {len(data)} bytes where its header {shape} needs {expected}; "
                        "it is truncated or corrupt, replace it with a good copy")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_split(split_name, images_path, labels_path):
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)  # [N, 28, 28], [N]
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                        "the files do not belong together")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{labels_path} holds label {labels.max()}; Fashion-MNIST has 10 classes (0..9)")
    return array_split(split_name, images, labels)


def load_fashion_mnist(args):
    source = Path(args.source or FASHION_MNIST_SOURCE)
    cache = download_dir(args)
    files = find_idx_files(source) or find_idx_files(cache)
    if files is None:
        print(f"no Fashion-MNIST idx files in {source}; downloading through torchvision into {cache}", flush=True)
        import torchvision  # only here: importing this module never reaches the network

        try:
            torchvision.datasets.FashionMNIST(root=str(cache), train=True, download=True)
        except Exception as err:  # URLError, timeouts, a bad checksum: all mean "not to be had here"
            raise UserError(f"no Fashion-MNIST idx files in --source {source} and the download failed "
                            f"({first_line(err)}); install the Debian package dataset-fashion-mnist or give "
                            "--source FOLDER holding the four idx files (.gz or not)") from err
        files = find_idx_files(cache)
        if files is None:
            raise UserError(f"torchvision downloaded Fashion-MNIST but {cache}/FashionMNIST/raw lacks the idx files; "
                            "remove that folder and run again")
    train = idx_split("train", files["train_images"], files["train_labels"])
    test = idx_split("test", files["test_images"], files["test_labels"])
    classes = {str(i): name for i, name in enumerate(FASHION_MNIST_CLASSES)}
    return Prepared(classes, train, test, str(files["train_images"].parent))


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10: the official python batches, or a folder of class subfolders


class BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 python batches and nothing else.

    The python version of CIFAR-10 is only distributed as pickled dicts, so reading it needs pickle: the one place
    in this repository that unpickles. Unpickling can run any code a file names, so only the few names those dicts
    need (numpy arrays, the bytes codec) are allowed; any other file is refused instead of executed.
    """
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return self.ALLOWED[(module, name)]


def read_batch(path):
    """(images uint8 [N, 32, 32, 3], labels [N]) of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the batches were pickled by Python 2; their str keys come back as bytes
            batch = BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError) as err:
        raise UserError(f"{path} is not a CIFAR-10 python batch ({first_line(err)}); "
                        "give --source the cifar-10-batches-py folder of the official python version") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{path} holds data {data.shape} and {len(labels)} labels, expected [N, 3072] and N")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise UserError(f"{path} holds label {labels.max()}; CIFAR-10 has 10 classes (0..9)")
    # each row is the red plane, then green, then blue, 32x32 each: [N, 3, 32, 32] -> [N, 32, 32, 3]
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def find_cifar_batches(folder):
    """The folder holding data_batch_1..5 and test_batch: folder itself or folder/cifar-10-batches-py, else None."""
    for base in (Path(folder), Path(folder) / "cifar-10-batches-py"):
        if all((base / name).is_file() for name in (*CIFAR10_TRAIN_BATCHES, "test_batch")):
            return base
    return None


def load_cifar10(args):
    if args.source is not None:
        source = Path(args.source)
        batches = find_cifar_batches(source)
        if batches is None:
            if not source.is_dir():
                raise UserError(f"--source {source} does not exist; give the cifar-10-batches-py folder or a folder "
                                "of class subfolders, or leave --source out to download")
            return load_folder(source, args)
    else:
        cache = download_dir(args)
        batches = find_cifar_batches(cache)
        if batches is None:
            print(f"downloading CIFAR-10 through torchvision into {cache}", flush=True)
            import torchvision  # only here: importing this module never reaches the network

            try:
                torchvision.datasets.CIFAR10(root=str(cache), train=True, download=True)
            except Exception as err:
                raise UserError(f"CIFAR-10 could not be downloaded ({first_line(err)}); give --source with the "
                                "cifar-10-batches-py folder or a folder of class subfolders") from err
            batches = find_cifar_batches(cache)
            if batches is None:
                raise UserError(f"torchvision downloaded CIFAR-10 but {cache}/cifar-10-batches-py is incomplete; "
                                "remove it and run again")
    parts = [read_batch(batches / name) for name in CIFAR10_TRAIN_BATCHES]
    train = array_split("train", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = array_split("test", *read_batch(batches / "test_batch"))
    classes = {str(i): name for i, name in enumerate(CIFAR10_CLASSES)}
    return Prepared(classes, train, test, str(batches))


# ---------------------------------------------------------------------------------------------------------------
# A folder of class subfolders


def is_hidden(name):
    return name.startswith(".")


SKIPPED = {  # why a file in a source folder was not taken, as counted and printed
    "special": "not regular files (FIFO, device, socket)",
    "outside": "symlinks leading outside the folder (--follow-symlinks follows them)",
    "broken": "broken or looping symlinks",
    "not-image": "files whose header is not an image",
}


def admissible(path, root, follow_symlinks, skipped):
    """True when path may be copied: a regular file whose header is an image, reached through a symlink only
    when the link stays inside root or follow_symlinks. Anything else is counted in skipped (a Counter)."""
    if os.path.islink(path):
        try:
            target = Path(os.path.realpath(path, strict=True))
        except (OSError, RuntimeError):  # dangling, or a loop (ELOOP)
            skipped["broken"] += 1
            return False
        if not follow_symlinks and not target.is_relative_to(root):
            skipped["outside"] += 1
            return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read, /dev/zero never ends
            skipped["special"] += 1
            return False
        with Image.open(path):
            return True
    except OSError:  # PIL's UnidentifiedImageError is an OSError too
        skipped["not-image"] += 1
        return False


def class_files(folder, root, follow_symlinks, skipped):
    """{class folder name: [image paths relative to that class folder, sorted]} for the class subfolders of folder.

    Images are files with a suffix in MyDataset.IMAGE_SUFFIXES, found recursively, that admissible() takes;
    hidden files and folders (.cache, .DS_Store) are skipped. Symlinked folders inside a class are not followed
    (no loop can trap the walk); a symlinked class folder is, when it stays inside root or follow_symlinks.
    """
    folder = Path(folder)
    found = {}
    loose = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(entry.name):
            continue
        if entry.is_file():
            loose += Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
            continue
        if not entry.is_dir(follow_symlinks=True):
            continue
        if entry.is_symlink() and not follow_symlinks and not Path(os.path.realpath(entry.path)).is_relative_to(root):
            skipped["outside"] += 1
            continue
        images = []
        for where, dirs, files in os.walk(entry.path):
            dirs[:] = [d for d in dirs if not is_hidden(d)]
            relative = Path(where).relative_to(entry.path)
            images += [(relative / name).as_posix() for name in files
                       if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES
                       and admissible(os.path.join(where, name), root, follow_symlinks, skipped)]
        if images:
            found[entry.name] = sorted(images)
        else:
            print(f"note: {entry.path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); not a class", flush=True)
    if loose:
        print(f"note: {loose} image(s) directly in {folder} belong to no class folder and are left out", flush=True)
    return found


def report_skipped(folder, skipped):
    if skipped:
        print(f"note: skipped {sum(skipped.values())} file(s) in {folder}: "
              + ", ".join(f"{count} {SKIPPED[why]}" for why, count in sorted(skipped.items())), flush=True)


def label_token(text):
    """A class folder's name (or a file's path) as a list-file token: whitespace separates fields, so it becomes '_'."""
    return re.sub(r"\s+", "_", text)


def token_map(class_names, folder):
    tokens = {}
    for name in class_names:
        token = label_token(name)
        if token in tokens.values():
            other = next(n for n, t in tokens.items() if t == token)
            raise UserError(f"class folders {other!r} and {name!r} in {folder} give the same label {token!r}; "
                            "rename one of them")
        tokens[name] = token
    return tokens


def split_rows(count, fraction, seed, token):
    """(train rows, test rows) of one class of `count` images, both sorted.

    Each class draws from its own generator, seeded by --seed and the label, so adding or removing a class leaves
    the split of every other class as it was. At least one image stays in training.
    """
    test_count = min(max(int(count * fraction + 0.5), 1 if count >= 2 else 0), count - 1)
    order = np.random.default_rng([seed, zlib.crc32(token.encode("utf-8"))]).permutation(count)
    return sorted(order[test_count:].tolist()), sorted(order[:test_count].tolist())


def files_split(split_name, folder, picked, tokens):
    """A LabelledImages copying files; picked: [(class folder name, path relative to it)]. Names stay unique."""
    names, labels, files, taken = [], [], [], set()
    for class_name, relative in picked:
        token = tokens[class_name]
        name = f"{split_name}/{token}/{label_token(relative)}"
        suffix = Path(name).suffix
        stem, n = name[:len(name) - len(suffix)], 1
        while name.lower() in taken:  # 'a b.png' and 'a_b.png', or names differing only in case
            n += 1
            name = f"{stem}_{n}{suffix}"
        taken.add(name.lower())
        names.append(name)
        labels.append(token)
        files.append(str(Path(folder) / class_name / relative))
    return LabelledImages(names, labels, files=files)


def check_overlap(folder, data_root):
    folder, data_root = Path(folder).resolve(), Path(data_root).resolve()
    for written in (data_root / "image", data_root / "query"):
        if written == folder or written.is_relative_to(folder) or folder.is_relative_to(written):
            raise UserError(f"{folder} and --data-root {data_root} overlap ({written} would be read and written); "
                            "choose another --data-root")


def load_folder(folder, args):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a folder of class subfolders: PATH/<class>/<image>")
    check_overlap(folder, args.data_root)
    root, skipped = folder.resolve(), Counter()
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        print(f"{folder} holds train/ and test/: keeping that split (--test-fraction and --seed unused)", flush=True)
        train_found = class_files(folder / "train", root, args.follow_symlinks, skipped)
        test_found = class_files(folder / "test", root, args.follow_symlinks, skipped)
        unseen = sorted(set(test_found) - set(train_found))
        if unseen:
            raise UserError(f"{folder / 'test'} has classes that {folder / 'train'} lacks ({', '.join(unseen[:5])}); "
                            "every test class must be a training class")
        tokens = token_map(train_found, folder / "train")
        train = files_split("train", folder / "train", [(c, p) for c in train_found for p in train_found[c]], tokens)
        test = files_split("test", folder / "test", [(c, p) for c in test_found for p in test_found[c]], tokens)
    else:
        found = class_files(folder, root, args.follow_symlinks, skipped)
        tokens = token_map(found, folder)
        train_picked, test_picked = [], []
        for class_name, paths in found.items():
            train_rows, test_rows = split_rows(len(paths), args.test_fraction, args.seed, tokens[class_name])
            train_picked += [(class_name, paths[row]) for row in train_rows]
            test_picked += [(class_name, paths[row]) for row in test_rows]
            if not test_rows:
                print(f"note: class {class_name!r} has a single image: it is in training only", flush=True)
        train = files_split("train", folder, train_picked, tokens)
        test = files_split("test", folder, test_picked, tokens)
    if len(train) == 0:
        raise UserError(f"{folder} holds no class subfolder with images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "arrange it as PATH/<class>/<image>")
    report_skipped(folder, skipped)
    classes = {token: name for name, token in tokens.items()}
    return Prepared(classes, train, test, str(folder), skipped={SKIPPED[why]: count for why, count in skipped.items()})


# ---------------------------------------------------------------------------------------------------------------
# Benchmark protocols: CIFAR-10 as DSH split it, and the standard lists of NUS-WIDE, MS-COCO and ImageNet-100


def check_protocol_args(args):
    if args.protocol != "dlbhc" and args.dataset != "cifar10":
        raise UserError(f"--protocol {args.protocol} is for cifar10; {args.dataset} has one protocol of its own")
    if args.lists is not None and args.dataset not in BENCHMARKS:
        raise UserError(f"--lists is for {', '.join(BENCHMARKS)}; {args.dataset} reads no list files")
    if args.dataset in BENCHMARKS and args.source is None:
        raise UserError(f"{args.dataset} needs the local copy of its images: python prepare_data.py {args.dataset} "
                        f"--source DIR [--lists DIR holding {', '.join(LIST_FILES.values())}]")
    fixed = args.dataset in BENCHMARKS or args.protocol == "dsh"
    if fixed and (args.limit_per_class is not None or args.limit_test_per_class is not None):
        raise UserError(f"{protocol_name(args)} fixes its counts; "
                        "leave out --limit-per-class and --limit-test-per-class")


def protocol_name(args):
    if args.dataset == "cifar10":
        return f"cifar10-{args.protocol}"
    return args.dataset if args.dataset in BENCHMARKS else None


def protocol_record(args):
    """What data/prepare_data.json records as `protocol` (database.py carries it to meta.json), or None."""
    name = protocol_name(args)
    if name is None or args.limit_per_class is not None or args.limit_test_per_class is not None:
        return None  # a limited CIFAR-10 is a subset, not the protocol
    return {"name": name, **PROTOCOLS[name]}


def check_counts(protocol, counts, where):
    """Refuse a split whose size is not the protocol's; where maps each role to what to name (a list file)."""
    for role in ("queries", "train", "database"):
        if counts[role] != protocol[role]:
            raise UserError(f"{where[role]} gives {counts[role]:,} {role} images where the {protocol['name']} protocol "
                            f"has {protocol[role]:,}; use the standard list files of HashNet / DeepHash-pytorch "
                            "(or the full official data)")


def dsh_split(prepared, seed):
    """CIFAR-10 as DSH split it: of all 60,000 images, per class 100 queries and 500 training images, drawn by seed.

    The database is every image but the queries (59,000), so it holds the training images, as in the papers.
    """
    pool = prepared.train.concat(prepared.test)
    queries, train = [], []
    for label in sort_labels(set(pool.labels)):
        rows = [row for row, token in enumerate(pool.labels) if token == label]
        needed = DSH_PER_CLASS["queries"] + DSH_PER_CLASS["train"]
        if len(rows) < needed:
            raise UserError(f"{prepared.source}: class {label} has {len(rows)} images; --protocol dsh needs {needed}")
        order = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))]).permutation(rows)
        queries += order[:DSH_PER_CLASS["queries"]].tolist()
        train += order[DSH_PER_CLASS["queries"]:needed].tolist()
    taken = set(queries)
    database = [row for row in range(len(pool)) if row not in taken]
    return Prepared(prepared.classes, pool.subset(sorted(train)), pool.subset(sorted(queries)), prepared.source,
                    database=pool.subset(database))


def standard_list(list_path, protocol):
    """The entries of one standard list file: one-hot rows, one column per class of the protocol."""
    entries = read_list(list_path, need_label=True)
    if entries.form != "onehot" or entries.columns != protocol["classes"]:
        found = f"{entries.columns} one-hot columns" if entries.form == "onehot" else "no one-hot rows"
        raise UserError(f"{list_path} has {found}; the {protocol['name']} lists have one 0/1 column per class "
                        f"({protocol['classes']})")
    return entries


def path_resolver(entries, source, list_path):
    """A function list path -> the image file under source (a str: the lists name 10^5 images).

    The lists name images relative to the data set's folder (DeepHash-pytorch: images/..., val_image/...) or by
    the absolute path on their authors' machine (HashNet: /home/.../coco/val2014/...). The leading folders to drop
    are found once, on the first line, and dropped from every line.
    """
    parts = entries[0].path.lstrip("/").split("/")
    for drop in range(len(parts)):
        if (source / "/".join(parts[drop:])).is_file():
            return lambda path: os.path.join(source, *path.lstrip("/").split("/")[drop:])
    raise UserError(f"{list_path}:{entries[0].line}: image {entries[0].path} is not under --source {source} (nor "
                    "any end of its path); give --source the folder the list's paths start from")


def check_files(files, entries, list_path):
    """Every image listed exists: one listing per folder, not a stat per file."""
    listed = {}
    for file, entry in zip(files, entries):
        folder, name = os.path.split(file)
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                listed[folder] = set()
        if name not in listed[folder]:
            raise UserError(f"{list_path}:{entry.line}: image {file} is missing; complete the local copy "
                            "or give --source the folder that holds it")


def benchmark_split(list_path, protocol, source):
    entries = standard_list(list_path, protocol)
    resolve = path_resolver(entries, source, list_path)
    files = [resolve(entry.path) for entry in entries]
    check_files(files, entries, list_path)
    return LabelledImages(files, [entry.label for entry in entries])


def load_benchmark(args):
    """NUS-WIDE-21, MS-COCO or ImageNet-100 from a local copy and the standard lists; counts checked, nothing copied."""
    protocol = {"name": args.dataset, **PROTOCOLS[args.dataset]}
    source = Path(args.source).resolve()
    lists = Path(args.lists).resolve() if args.lists else source
    if not source.is_dir():
        raise UserError(f"--source {args.source} is not a folder; give the local copy of {args.dataset}'s images")
    # list files separate fields by whitespace: the lists' own paths have none, the folder they go under may
    if any(c.isspace() for c in str(source)):
        raise UserError(f"--source {source} holds whitespace, which list files cannot carry; "
                        "move the copy to a folder without spaces")
    paths = {role: lists / name for role, name in LIST_FILES.items()}
    for role, path in paths.items():
        if not path.is_file():
            raise UserError(f"{path} is missing: {args.dataset} reads the standard list files "
                            f"{', '.join(LIST_FILES.values())} of HashNet / DeepHash-pytorch; give their folder "
                            "with --lists")
    splits = {role: benchmark_split(path, protocol, source) for role, path in paths.items()}
    check_counts(protocol, {role: len(split) for role, split in splits.items()}, paths)
    tokens = sort_labels({label for split in splits.values() for token in split.labels for label in token.split(",")})
    classes = {token: token for token in tokens}  # the lists carry column indices only
    return Prepared(classes, splits["train"], splits["queries"], str(source), database=splits["database"],
                    in_place=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing: images in worker processes, then the list files


def png_bytes(pixels):
    """uint8 [H, W] (mode L) or [H, W, 3] (RGB) as PNG bytes; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def holds(path, data, pixels):
    """True when the file at path holds these bytes, or (PNG written by another Pillow) these very pixels."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return True
        if pixels is None:
            return False
        with Image.open(path) as image:
            return image.format == "PNG" and np.array_equal(np.asarray(image), pixels)
    except (OSError, ValueError, SyntaxError):
        return False


def store(path, data, pixels, force, like=None):
    """Write data to path unless it already holds it: 'written' or 'unchanged'.

    A different file already there is a UserError unless force. The bytes go to a fixed temporary name that is
    renamed onto path, so a killed run leaves whole images (and at most one stray .tmp per image, reused next time).
    like: a file whose mtime the copy takes, as shutil.copy2 does.
    """
    if os.path.lexists(path):
        if holds(path, data, pixels):
            return "unchanged"
        if not force:
            raise UserError(f"{path} already exists and differs from the image this command writes; "
                            "pass --force to overwrite it, or choose another --data-root")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if like is not None:
        shutil.copystat(like, tmp)
    os.replace(tmp, path)
    return "written"


def read_regular_file(path):
    """The bytes of path, refused unless it is (still) a regular file: never blocks on a FIFO swapped in."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def write_chunk(task):
    """Worker: write one chunk of a split into each of its folders. Returns (images, Counter of outcomes)."""
    folders, names, pixels, files, force = task
    outcomes = Counter()
    for i, name in enumerate(names):
        if pixels is not None:
            data, like, image = png_bytes(pixels[i]), None, pixels[i]
        else:
            try:
                data, like, image = read_regular_file(files[i]), files[i], None
            except OSError as err:
                raise UserError(f"{files[i]} cannot be read ({first_line(err)})") from None
        for folder in folders:
            outcomes[store(Path(folder) / name, data, image, force, like)] += 1
    return len(names), outcomes


def image_tasks(split, folders, force):
    for start in range(0, len(split), CHUNK):
        stop = start + CHUNK
        yield (folders, split.names[start:stop], None if split.pixels is None else split.pixels[start:stop],
               None if split.files is None else split.files[start:stop], force)


def write_images(parts, workers, force):
    """parts: [(LabelledImages, [folders])]. Writes every image into each of its folders; returns a Counter of outcomes."""
    for split, folders in parts:
        for parent in sorted({os.path.dirname(name) for name in split.names}):
            for folder in folders:
                (Path(folder) / parent).mkdir(parents=True, exist_ok=True)
    tasks = [task for split, folders in parts for task in image_tasks(split, [str(f) for f in folders], force)]
    total = sum(len(split) for split, _ in parts)
    outcomes = Counter()
    with tqdm(total=total, desc="write images", unit="img", mininterval=1) as bar:
        if workers == 1 or len(tasks) == 1:
            results = map(write_chunk, tasks)
            for count, counted in results:
                bar.update(count)
                outcomes.update(counted)
        else:
            with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
                for count, counted in pool.imap_unordered(write_chunk, tasks):
                    bar.update(count)
                    outcomes.update(counted)
    return outcomes


def list_text(split):
    """`<name> <label>` lines; several labels are written `<name> <label>,<label>` (MyDataset reads both)."""
    return "".join(f"{name} {label}\n" if label else f"{name}\n" for name, label in zip(split.names, split.labels))


def per_class(labels):
    """Images per label; an image with several labels counts for each."""
    counted = Counter(label for token in labels for label in token.split(",") if label)
    return {label: counted[label] for label in sort_labels(counted)}


def refuse_differing_lists(lists, force):
    """Stop before writing anything when a list file already there differs from the one this command writes."""
    for path, text in lists.items():
        if path.is_file() and path.read_bytes() != text.encode("utf-8") and not force:
            raise UserError(f"{path} already exists and differs from the list this command writes; pass --force to "
                            "replace it (and the images of the same names), or choose another --data-root")


# ---------------------------------------------------------------------------------------------------------------


def load(args):
    if args.dataset == "fashion-mnist":
        return load_fashion_mnist(args)
    if args.dataset == "cifar10":
        prepared = load_cifar10(args)
        return dsh_split(prepared, args.seed) if args.protocol == "dsh" else prepared
    if args.dataset in BENCHMARKS:
        return load_benchmark(args)
    return load_folder(args.path, args)


def label_set(labels):
    """The single labels of a split's tokens ('3' or '3,5'); '' (no label) adds none."""
    return {label for token in labels for label in token.split(",") if label}


def checked_protocol(args, counts, source):
    """The protocol record for prepare_data.json, its counts checked: cifar10 dlbhc records it only when they match."""
    protocol = protocol_record(args)
    if protocol is None:
        return None
    if protocol["name"] == "cifar10-dlbhc":  # today's split of whatever --source holds: no error, and no claim
        return protocol if all(counts[role] == protocol[role] for role in ("queries", "train", "database")) else None
    check_counts(protocol, counts, {role: source for role in ("queries", "train", "database")})
    print(f"protocol {protocol['name']}: {counts['queries']:,} queries, {counts['train']:,} training images, "
          f"{counts['database']:,} database images, as the protocol has them; mAP@"
          f"{protocol['topk'] or 'all'}, relevant = {protocol['relevance']}", flush=True)
    return protocol


def layout(prepared, train, test, data_root):
    """({list path: text}, [(LabelledImages, [folders])] of images to write) for the usual layout."""
    database = prepared.database or train  # by default the training split: queries are not in it
    image_folder, query_folder = Path(data_root) / "image", Path(data_root) / "query"
    lists = {
        image_folder / "trainlist.txt": list_text(train),
        image_folder / "testlist.txt": list_text(test),
        image_folder / "list.txt": list_text(database),
        query_folder / "list.txt": list_text(test),
    }
    if prepared.in_place:
        return lists, []
    in_database = set(database.names)
    train_only = train.subset([row for row, name in enumerate(train.names) if name not in in_database])
    parts = [(database, [image_folder]), (train_only, [image_folder]), (test, [image_folder, query_folder])]
    return lists, [(split, folders) for split, folders in parts if len(split)]


def main():
    args = get_args_parser().parse_args()
    check_args(args)
    print_args(args)
    started = time.perf_counter()
    prepared = load(args)
    train = prepared.train.subset(first_per_class(prepared.train.labels, args.limit_per_class))
    test = prepared.test.subset(first_per_class(prepared.test.labels, args.limit_test_per_class))
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"{prepared.source} gives {len(train)} training and {len(test)} test image(s); "
                        "both splits need at least one")
    unseen = sort_labels(label_set(test.labels) - label_set(train.labels))
    if unseen:
        raise UserError(f"test label(s) {', '.join(unseen[:5])} have no training image; every test class needs one")
    database = prepared.database or train
    counts = {"train": len(train), "test": len(test), "database": len(database), "queries": len(test)}
    protocol = checked_protocol(args, counts, prepared.source)
    lists, parts = layout(prepared, train, test, args.data_root)
    refuse_differing_lists(lists, args.force)
    classes = {label: prepared.classes[label] for label in sort_labels(prepared.classes)}
    print("classes (label: name):", ", ".join(f"{label}: {name}" for label, name in classes.items()), flush=True)
    outcomes = write_images(parts, args.workers, args.force) if parts else Counter()
    for path, text in lists.items():  # last, so that a list never names an image not yet written
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            write_text(path, text)
    counts.update({"train_per_class": per_class(train.labels), "test_per_class": per_class(test.labels)})
    write_json(Path(args.data_root) / "prepare_data.json",
               {"dataset": args.dataset, "source": prepared.source, "classes": classes, "counts": counts,
                "protocol": protocol, "skipped": prepared.skipped or {}, "args": vars(args)})
    summary = {"data_root": args.data_root, "classes": len(classes), "protocol": protocol and protocol["name"],
               **{k: v for k, v in counts.items() if not k.endswith("per_class")},
               "files_written": outcomes["written"], "files_unchanged": outcomes["unchanged"],
               "seconds": elapsed(started)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    run_main(main)
