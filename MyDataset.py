"""List files, image reading, the decoded-image cache and the transforms.

Layout (as in the original repo):
    data/image/trainlist.txt, testlist.txt   <path relative to data/image> <label>
    data/image/list.txt                      <path> [label]      the database to encode
    data/query/list.txt                      <path> [label]      the queries
A label may also be several, `<path> <label>,<label>,...`, or one-hot columns as in HashNet's and DeepHash-pytorch's
lists, `<path> 0 1 0 ... 1` (two columns or more; label i where column i is 1); read_list says which form a file uses.

Images are decoded once into a uint8 cache ([N, H, W, 3], on disk beside the data under .cache/, keyed by the list
file's entries and the images' sizes and mtimes) and then cropped, flipped, resized and normalised as whole batches
on the device. Data sets too large for that stream through a DataLoader with workers that decode and resize to the
same uint8 form; the device does the rest in both cases.

torch is imported inside the functions that use it, so prepare_data.py, which reads list files and images but
runs no network, starts without it.
"""
import copy
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from stage import UserError, atomic_write

CACHE_VERSION = 1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
Image.MAX_IMAGE_PIXELS = 20000 * 20000  # large scans are fine; decompression bombs beyond that are refused
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a silently grey image


# ---------------------------------------------------------------------------------------------------------------
# List files


@dataclass
class Entry:
    path: str  # as written in the list file, relative to its folder
    label: str | None  # the line's label; None where it has none; "a,b" where it has several
    line: int  # 1-based line number, for error messages
    labels: tuple = ()  # every label of the line (one-hot: the indices of its 1 columns); () where none

    def __post_init__(self):
        if not self.labels and self.label is not None:
            self.labels = (self.label,)


class ListFile(list):
    """The entries of a list file, with the form it was written in.

    form: "labels" (`<path> <label>[,<label>...]`), "onehot" (`<path> 0 1 0 ... 1`) or "paths" (no line has a
    label); columns: the number of one-hot columns (None otherwise); multi: some line has two labels or more.
    """

    def __init__(self, entries, form, columns):
        super().__init__(entries)
        self.form, self.columns = form, columns
        self.multi = any(len(entry.labels) > 1 for entry in entries)


ONE_HOT_VALUES = frozenset(("0", "1"))
LIST_FORMS = "'<path> <label>', '<path> <label>,<label>,...' or one-hot '<path> 0 1 0 ... 1' (two columns or more)"


def parse_labels(fields, list_path, number, line):
    """(form, labels) of one line's label fields; one-hot needs two columns or more, so `<path> 1` is label "1"."""
    if len(fields) == 1:
        tokens = fields[0].split(",")
        if not all(tokens):
            raise UserError(f"{list_path}:{number}: empty label in {fields[0]!r}; write '<path> <label>,<label>'")
        return "labels", tuple(dict.fromkeys(tokens))
    if not ONE_HOT_VALUES.issuperset(fields):
        raise UserError(f"{list_path}:{number}: expected {LIST_FORMS} separated by whitespace; one-hot columns are "
                        f"0 or 1, got {len(fields) + 1} field(s): {line.strip()[:80]!r}")
    labels, column = [], -1
    for _ in range(fields.count("1")):  # each 1 found by the C search, not a Python loop over every column
        column = fields.index("1", column + 1)
        labels.append(str(column))
    return "onehot", tuple(labels)


def parse_lines(text, list_path, need_label):
    """(entries, form, one-hot column count) of a list file's text; a file uses one form throughout."""
    entries, form, columns, first = [], None, None, None
    # lines end at \n, \r\n or \r only: a name holding another line separator is refused below, not split
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        bad = control_character(line, CONTROL_BUT_TAB)  # spaces and tabs separate fields; nothing else may
        if bad is not None:
            raise UserError(f"{list_path}:{number}: holds the control character {bad!r}, which would break the "
                            f"one-line-per-item files; rename the file: {line.strip()[:80]!r}")
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            if need_label:
                raise UserError(f"{list_path}:{number}: expected {LIST_FORMS} separated by whitespace, "
                                f"got 1 field: {line.strip()[:80]!r}")
            entries.append(Entry(fields[0], None, number))
            continue
        line_form, labels = parse_labels(fields[1:], list_path, number, line)
        if form is not None and line_form != form:
            names = {"labels": "'<path> <label>'", "onehot": "one-hot"}
            raise UserError(f"{list_path}:{number}: a {names[line_form]} line in a file of {names[form]} lines "
                            f"(from line {first}); a list file uses one form throughout")
        if line_form == "onehot" and columns is not None and len(fields) - 1 != columns:
            raise UserError(f"{list_path}:{number}: {len(fields) - 1} one-hot columns where line {first} has "
                            f"{columns}; every row needs one column per class")
        if form is None:
            form, first = line_form, number
            columns = len(fields) - 1 if line_form == "onehot" else None
        if not labels and need_label:
            raise UserError(f"{list_path}:{number}: every one-hot column is 0, so the image has no label; "
                            "give it one or leave it out")
        label = ",".join(labels) if labels else None
        entries.append(Entry(fields[0], label, number, labels))
    return entries, form or "paths", columns


# Unicode's categories Cc (controls), Zl and Zp (line and paragraph separators): fixed sets under Unicode's stability
# policy (a test checks both classes against unicodedata over every code point)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # in list lines, tabs separate fields


def control_character(text, pattern=CONTROL):
    """The first control or line-separator character in text, or None: such a name would break the
    one-line-per-item files (list files, names files, query.txt)."""
    found = pattern.search(text)
    return found.group() if found else None


def outside(path):
    """True when a list entry leads outside its list's folder: an absolute path, or one climbing out with '..'."""
    return os.path.isabs(path) or (".." in path and os.path.normpath(path).split(os.sep)[0] == "..")


def read_list(list_path, need_label, strict_paths=False):
    """Parse a list file (label optional unless need_label). Blank lines, CRLF, a BOM are fine.

    Lines are `<path> <label>`, `<path> <label>,<label>,...` or one-hot `<path> 0 1 0 ... 1` (HashNet's and
    DeepHash-pytorch's lists: one 0/1 column per class, label i where column i is 1). A file uses one form.
    One-hot needs two columns or more: `<path> 1` is the single label "1". Returns a ListFile.

    Entries outside the list's folder are read (people keep images on other disks) with a one-line warning,
    or refused with strict_paths. A control character in a line is refused.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UserError(f"list file {list_path} does not exist; create it or run: python prepare_data.py fashion-mnist")
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{list_path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    entries, form, columns = parse_lines(text, list_path, need_label)
    if not entries:
        raise UserError(f"list file {list_path} has no entries; each line is '<path> <label>'")
    seen, duplicates = set(), 0
    for entry in entries:
        duplicates += entry.path in seen
        seen.add(entry.path)
    check_outside(list_path, entries, strict_paths)
    if duplicates:  # printed, not warnings.warn: PYTHONWARNINGS=ignore must not hide it, and it stays one line
        print(f"warning: {list_path}: {duplicates} duplicate path(s); each is used as often as it is listed",
              file=sys.stderr, flush=True)
    return ListFile(entries, form, columns)


def is_multi_label(*entry_lists):
    """True when some entry of these lists has two labels or more: training and relevance are then multi-label."""
    return any(len(entry.labels) > 1 for entries in entry_lists for entry in entries)


def check_outside(list_path, entries, strict_paths):
    away = [entry for entry in entries if outside(entry.path)]
    if away and strict_paths:
        raise UserError(f"{list_path}:{away[0].line}: {away[0].path!r} is outside {list_path.parent} "
                        f"({len(away)} such entries); move the images under it, or drop --strict-paths")
    if away:
        print(f"warning: {list_path}: {len(away)} path(s) outside {list_path.parent}, first {away[0].path!r} "
              f"(line {away[0].line}); read as given (--strict-paths refuses them)", file=sys.stderr, flush=True)


def sort_labels(labels):
    """Sorted label strings, numerically when every label is an integer."""
    labels = set(labels)
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def training_classes(train_entries):
    return sort_labels(label for entry in train_entries for label in entry.labels)


def class_indices(entries, classes, list_path):
    """Label index of each entry against the training classes; an unseen label is an error (testlist)."""
    index = {label: i for i, label in enumerate(classes)}
    return np.array([training_class(index, entry, entry.label, list_path) for entry in entries], dtype=np.int64)


def training_class(index, entry, label, list_path):
    """index[label], or the one-line error naming the list line whose label training never saw."""
    if label not in index:
        raise UserError(f"{list_path}:{entry.line}: label {label!r} never occurs in the training list; "
                        "every testlist label must be a training class")
    return index[label]


def retrieval_labels(entries, classes, known):
    """Labels for database or query entries: training classes first, unseen labels appended (sorted), -1 unknown.

    known maps path -> label from trainlist/testlist for lines without a label. Returns (indices int64 [N],
    the extended label list).
    """
    labels = [entry.label if entry.label is not None else known.get(entry.path) for entry in entries]
    trained = set(classes)
    extra = sort_labels(label for label in labels if label is not None and label not in trained)
    every = list(classes) + extra
    index = {label: i for i, label in enumerate(every)}
    return np.array([index[label] if label is not None else -1 for label in labels], dtype=np.int64), every


def multi_hot(entries, classes, list_path):
    """Multi-hot labels bool [N, C] against the training classes; an unseen label is an error (testlist)."""
    index = {label: i for i, label in enumerate(classes)}
    hot = np.zeros((len(entries), len(classes)), dtype=bool)
    for row, entry in enumerate(entries):
        for label in entry.labels:
            hot[row, training_class(index, entry, label, list_path)] = True
    return hot


def retrieval_multi_hot(entries, classes, known):
    """retrieval_labels for multi-label data: (bool [N, C'], the extended label list); a row of zeros is unknown.

    known maps path -> labels (a tuple) from trainlist/testlist for lines without a label.
    """
    labels = [entry.labels or known.get(entry.path, ()) for entry in entries]
    trained = set(classes)
    every = list(classes) + sort_labels({label for row in labels for label in row if label not in trained})
    index = {label: i for i, label in enumerate(every)}
    hot = np.zeros((len(entries), len(every)), dtype=bool)
    for row, row_labels in enumerate(labels):
        hot[row, [index[label] for label in row_labels]] = True
    return hot, every


# ---------------------------------------------------------------------------------------------------------------
# Images


class BadImage(Exception):
    """An image that cannot be read; the message names the file and what is wrong."""


def image_header(path):
    """(width, height) from the header alone; BadImage when missing, empty or not an image."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    if size == 0:
        raise BadImage(f"{path}: file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:
        raise BadImage(f"{path}: not a readable image ({type(err).__name__})") from None


def read_image(path):
    """Decode to an RGB PIL image: EXIF rotation applied; grayscale, palette, RGBA, 16-bit and CMYK converted."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, not clip
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
                image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
            elif image.mode in ("P", "PA", "LA"):
                image = image.convert("RGBA")
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    except Exception as err:
        raise BadImage(f"{path}: cannot be decoded ({type(err).__name__}: {str(err)[:80]})") from None


def check_images(folder, entries, skip_bad):
    """Read every header before any long work. Returns (sizes [(w, h)], bad [(index, message)]).

    Raises UserError on the first bad image unless skip_bad.
    """
    sizes, bad = [], []
    for i, entry in enumerate(tqdm(entries, desc=f"check {folder}", unit="img", leave=False, mininterval=1)):
        try:
            sizes.append(image_header(Path(folder) / entry.path))
        except BadImage as err:
            if not skip_bad:
                raise UserError(f"{err} (listed at line {entry.line}); fix or remove it, or pass --skip-bad") from None
            sizes.append(None)
            bad.append((i, str(err)))
    return sizes, bad


def store_size(sizes, img_size):
    """The (height, width) images are cached at: their own when all share one small size, else a square.

    The square is img_size * 8/7 (256 for 224), room for the random crop to take from.
    """
    square = math.ceil(img_size * 8 / 7)
    known = {s for s in sizes if s is not None}
    if len(known) == 1:
        width, height = next(iter(known))
        if width <= square and height <= square:
            return height, width
    return square, square


def image_files(paths):
    """The image files named on a command line (--image): files as given, folders searched recursively."""
    files = []
    for given in paths:
        path = Path(given)
        if control_character(str(given)) is not None:
            raise UserError(f"--image {str(given)!r}: the name holds a control character, which would break the "
                            "one-line-per-item results; rename the file")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"--image {given}: no image file ({' '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            named = [p for p in found if control_character(str(p)) is not None]
            if named:
                raise UserError(f"--image {given}: {str(named[0])!r} holds a control character, which would break "
                                "the one-line-per-item results; rename it")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists():  # a FIFO would block, /dev/zero never ends: only regular files are images
            raise UserError(f"--image {given}: not a regular file (a FIFO, device or socket); give an image file")
        else:
            raise UserError(f"--image {given}: no such file or folder")
    return files


class MyDataset:  # a map-style dataset for torch's DataLoader
    """Images of a list file as uint8 tensors [H, W, 3] at one stored size, with their label indices."""

    def __init__(self, folder, entries, labels, size):
        self.folder, self.entries, self.labels, self.size = Path(folder), entries, labels, size

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        """(image uint8 [H, W, 3], label, ok); ok is False (and the image zeros) where decoding failed."""
        import torch
        height, width = self.size
        # an int, or for multi-label data a [C] row that the loader stacks into [B, C]
        label = int(self.labels[i]) if np.ndim(self.labels[i]) == 0 else torch.from_numpy(np.array(self.labels[i]))
        try:
            image = read_image(self.folder / self.entries[i].path)
        except BadImage as err:
            return torch.zeros(height, width, 3, dtype=torch.uint8), label, str(err)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()), label, ""


def loader(dataset, batch_size, workers):
    """A DataLoader over dataset in order: workers decode and resize, the caller batches on."""
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


# ---------------------------------------------------------------------------------------------------------------
# The decoded-image cache


def cache_key(folder, entries, size):
    """Changes whenever the listed paths, their order, or any image's byte size or mtime change."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size[0]}x{size[1]}\n".encode())
    for entry in entries:
        try:
            stat = os.stat(Path(folder) / entry.path)
            digest.update(f"{entry.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{entry.path}\0missing\n".encode())
    return digest.hexdigest()[:20]


def decoded_images(folder, entries, size, name, workers, skip_bad, cache=True):
    """All images of entries as one uint8 array [N, H, W, 3] (memory-mapped from the cache when cache is True).

    Returns (images, bad) with bad = [(index, message)] for images that failed to decode (zeros in the array);
    raises UserError on the first such image unless skip_bad. name tells caches of different lists apart.
    """
    folder = Path(folder)
    cache_dir = folder / ".cache"
    path = cache_dir / f"{name}_{cache_key(folder, entries, size)}.npy"
    bad_path = path.with_suffix(".bad.txt")
    if cache and path.is_file():
        try:
            images = np.load(path, mmap_mode="r")
            bad = _read_bad(bad_path) if bad_path.is_file() else []
            if images.shape == (len(entries), *size, 3) and images.dtype == np.uint8:
                if bad and not skip_bad:
                    raise UserError(f"{bad[0][1]}; fix or remove it, or pass --skip-bad")
                return images, bad
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt below
    dataset = MyDataset(folder, entries, np.zeros(len(entries), dtype=np.int64), size)
    batches = loader(dataset, batch_size=256, workers=workers)

    def fill(out):
        bad = []
        start = 0
        for images, _, errors in tqdm(batches, desc=f"decode {name}", unit="batch", leave=False):
            out[start:start + len(images)] = images.numpy()
            for offset, message in enumerate(errors):
                if message:
                    if not skip_bad:
                        raise UserError(f"{message}; fix or remove it, or pass --skip-bad")
                    bad.append((start + offset, message))
            start += len(images)
        return bad

    if not cache:
        images = np.empty((len(entries), *size, 3), dtype=np.uint8)
        return images, fill(images)
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = {}

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), *size, 3))
        result["bad"] = fill(out)
        out.flush()
        del out

    atomic_write(path, write)
    atomic_write(bad_path, lambda tmp: Path(tmp).write_text(
        "".join(f"{i}\t{message}\n" for i, message in result["bad"]), encoding="utf-8"))
    for stale in cache_dir.glob(f"{name}_*"):  # older caches of the same list can never be used again
        if not stale.name.startswith(path.stem):
            stale.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), result["bad"]


def _read_bad(path):
    rows = [line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(int(i), message) for i, message in rows]


# ---------------------------------------------------------------------------------------------------------------
# Transforms: whole batches on the device


def normalise(images, mean, std):
    """uint8 [B, H, W, 3] on the device -> float [B, 3, H, W] normalised (channels_last memory)."""
    import torch
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def eval_transform(images, img_size, mean, std):
    """The whole image resized to img_size x img_size: what database.py and query.py encode."""
    import torch
    import torch.nn.functional as F
    x = normalise(images, mean, std)
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > img_size or x.shape[-2] > img_size)
    return x.contiguous(memory_format=torch.channels_last)


def train_transform(images, img_size, mean, std, generator, min_area=0.6, rows=None):
    """Random crop (area min_area..1 of the image, aspect 3/4..4/3), random horizontal flip, resize to img_size.

    One affine grid for the whole batch: crop, flip and resize are a single grid_sample on the device.
    generator is a torch.Generator on the CPU, so the crops are the same on any device for a given seed.
    rows=(start, stop, batch): images are rows start:stop of a batch of that many (a rank's share under torchrun);
    the draws are made for the whole batch, so each image gets the crop a single process would give it.
    """
    import torch
    import torch.nn.functional as F
    x = normalise(images, mean, std)
    start, stop, batch = rows if rows is not None else (0, x.shape[0], x.shape[0])
    area = torch.empty(batch).uniform_(min_area, 1.0, generator=generator)
    log_ratio = torch.empty(batch).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    scale_x = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width taken
    scale_y = (area / ratio).sqrt().clamp(max=1.0)
    shift_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - scale_x)
    shift_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - scale_y)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x * flip, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, shift_y
    # a streamed batch may have lost images found bad only when decoded (--skip-bad): the draws were made for the
    # whole batch all the same, so the generator stays where a clean pass would leave it
    theta = theta[start:stop][:x.shape[0]]
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], 3, img_size, img_size], align_corners=False)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------------
# Batches on the device, from the cache or streamed


def batch_share(count, rank, world_size):
    """(start, stop): rank's contiguous piece of a batch of count images split over world_size ranks."""
    return count * rank // world_size, count * (rank + 1) // world_size


def total_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ImagePass:
    """One pass over an ImageSource: iterate it for (images, labels, positions) batches on the device.

    `bad` lists (entry index, message) for the images this pass found broken only when it decoded them (streaming
    with skip_bad): they are left out of their batch. The source itself never changes; callers report these.
    """

    def __init__(self, batches):
        self.bad = []
        self._batches = batches(self.bad)

    def __iter__(self):
        return self._batches


class ImageSource:
    """The images of one list, checked, decoded and ready to be served in batches of uint8 on the device.

    cache=True (the default for every stage): decoded once into the on-disk cache, then held in memory (or in GPU
    memory when it fits) so an epoch costs no decoding at all. cache=False streams through a DataLoader whose
    workers decode and resize; use it for collections too large for the cache's disk or memory.
    Images that fail (missing, empty, not an image, broken further in) are an error naming the file, or with
    skip_bad are left out: `bad` lists them and `keep` holds the indices of the entries that take part. Both are
    fixed once the source is made; a streamed image that breaks only when decoded is reported by the pass
    (ImagePass.bad).
    checked is check_images' (sizes, bad) when the caller read every list's headers before decoding any of them.
    """

    def __init__(self, folder, entries, labels, img_size, name, workers=2, skip_bad=False, cache=True,
                 device=None, checked=None):
        import torch
        device = torch.device("cpu") if device is None else device
        self.folder, self.entries, self.name = Path(folder), entries, name
        self.workers, self.device, self.cache, self.skip_bad = workers, device, cache, skip_bad
        sizes, self.bad = checked if checked is not None else check_images(folder, entries, skip_bad)
        self.size = store_size(sizes, img_size)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images = None
        if cache:
            images, decode_bad = decoded_images(folder, entries, self.size, name, workers, skip_bad)
            # one entry per image: the header check's message wins over the decoder's for the same file
            self.bad = sorted({**dict(decode_bad), **dict(self.bad)}.items())
            self.images = self._resident(images)
        bad_index = {i for i, _ in self.bad}
        self.keep = np.array([i for i in range(len(entries)) if i not in bad_index], dtype=np.int64)
        if len(self.keep) == 0:
            raise UserError(f"no readable image in {self.folder} for {name}; see the errors above")

    def _resident(self, images):
        """The cache as a torch tensor: on the GPU when it takes under a third of free memory, else host memory."""
        import torch
        if self.device.type == "cuda" and images.nbytes < torch.cuda.mem_get_info(self.device)[0] / 3:
            return torch.from_numpy(np.array(images)).to(self.device)
        if images.nbytes < total_memory_bytes() / 4:
            return torch.from_numpy(np.array(images))  # read once into memory
        return images  # memory-mapped numpy array: pages come from disk as batches need them

    def __len__(self):
        return len(self.keep)

    def first(self, count):
        """The same source limited to its first count images: a new object, this one is unchanged."""
        head = copy.copy(self)
        head.keep = self.keep[:count]
        return head

    def batches(self, batch_size, generator=None, rank=0, world_size=1, whole=False):
        """An ImagePass yielding (images uint8 [B, H, W, 3], labels int64 [B], positions [B]) on the device.

        positions index self.keep. generator (a CPU torch.Generator) shuffles; None keeps list order.
        Under torchrun each rank gets its share (batch_share): whole=False splits every batch of batch_size into
        world_size contiguous pieces (training: --batch-size is the global batch); whole=True deals out whole
        batches (encoding: each batch is composed as in a single process, so its float results are the same).
        """
        import torch
        order = (torch.randperm(len(self.keep), generator=generator) if generator is not None
                 else torch.arange(len(self.keep)))
        plan = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if whole:
            plan = plan[rank::world_size]
        else:
            plan = [positions[slice(*batch_share(len(positions), rank, world_size))] for positions in plan]
        plan = [positions for positions in plan if len(positions)]
        if self.images is not None:
            return ImagePass(lambda bad: self._cached_batches(plan))
        return ImagePass(lambda bad: self._streamed_batches(plan, bad))

    def _cached_batches(self, plan):
        import torch
        labels = torch.from_numpy(self.labels[self.keep])
        keep = torch.from_numpy(self.keep)
        on_device = isinstance(self.images, torch.Tensor) and self.images.device == self.device
        for positions in plan:
            rows = keep[positions]
            if on_device:
                images = self.images[rows.to(self.device)]
            elif isinstance(self.images, np.ndarray):  # memory-mapped: read rows in file order, then batch order
                sorted_rows, back = np.unique(rows.numpy(), return_inverse=True)
                images = torch.from_numpy(self.images[sorted_rows][back])
            else:
                images = self.images[rows]
            if self.device.type == "cuda" and not on_device:
                images = images.pin_memory()
            yield (images.to(self.device, non_blocking=True), labels[positions].to(self.device, non_blocking=True),
                   positions)

    def _streamed_batches(self, plan, bad):
        """Batches decoded by DataLoader workers; images that break here go to bad, or stop the run without skip_bad."""
        import torch
        dataset = MyDataset(self.folder, [self.entries[i] for i in self.keep], self.labels[self.keep], self.size)
        batch_sampler = [positions.tolist() for positions in plan]
        stream = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        for positions, (images, batch_labels, errors) in zip(batch_sampler, stream):
            failed = [k for k, message in enumerate(errors) if message]
            if failed and not self.skip_bad:
                raise UserError(f"{errors[failed[0]]}; fix or remove it, or pass --skip-bad")
            if failed:  # left out of this batch and reported by the pass
                bad.extend((int(self.keep[positions[k]]), errors[k]) for k in failed)
                good = torch.tensor([not message for message in errors])
                images, batch_labels = images[good], batch_labels[good]
                positions = [p for p, ok in zip(positions, good.tolist()) if ok]
                if not positions:
                    continue
            yield (images.to(self.device, non_blocking=True), batch_labels.to(self.device, non_blocking=True),
                   torch.tensor(positions, dtype=torch.int64))
