"""prepare_data.py through its real command line, on tiny generated Fashion-MNIST, CIFAR-10 and folder data sets.

Nothing is downloaded: every run gets --source (or PATH) with generated files; the one run that would download
has its proxies pointed at a closed port.
"""
import gzip
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import MyDataset  # noqa: E402  (after the path is set)

CLASSES = 3


def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def one_line_error(result):
    """The error line of a refused run: exit 2, no traceback, one 'error:' line last (after any progress bar)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
    return lines[-1]


def read_lines(path):
    """[(path, label)] of a list file."""
    return [tuple(line.split()) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every file under root except the run record."""
    files = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name != "prepare_data.json":
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def idx_bytes(array):
    """The idx format written out by hand: 0, 0, 0x08 (unsigned byte), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_fashion_mnist(folder, train_per_class=5, test_per_class=3, gz=True, seed=0):
    """Four idx files of distinct random 28x28 images in CLASSES classes, labels in shuffled order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, per_class, stem in (("train", train_per_class, "train"), ("test", test_per_class, "t10k")):
        labels = rng.permutation(np.repeat(np.arange(CLASSES), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        for name, array in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(idx_bytes(array))
            else:
                (folder / name).write_bytes(idx_bytes(array))
        data[split] = (images, labels)
    return data


def lookup(images, labels):
    """pixel bytes -> (index in the split, label): the images are distinct, so this identifies each one."""
    table = {image.tobytes(): (index, int(label)) for index, (image, label) in enumerate(zip(images, labels))}
    assert len(table) == len(images)
    return table


def found_images(folder, lines, table):
    """Indices of the listed images in the fake split; asserts each decodes to a fake image with its label."""
    indices = []
    for path, label in lines:
        image = pixels(Path(folder) / path)
        assert image.dtype == np.uint8 and image.shape == (28, 28)
        assert image.tobytes() in table, f"{path} holds pixels of no generated image"
        index, true_label = table[image.tobytes()]
        assert label == str(true_label), f"{path} is labelled {label}, generated with {true_label}"
        indices.append(index)
    return indices


def test_fashion_mnist_layout(tmp_path):
    data = fake_fashion_mnist(tmp_path / "source")
    root = tmp_path / "data"
    result = ok(run_prepare("fashion-mnist", "--source", tmp_path / "source", "--data-root", root, "--workers", 2))
    assert "T-shirt/top" in result.stdout and "Ankle boot" in result.stdout  # the class names are printed
    train_lines = read_lines(root / "image" / "trainlist.txt")
    test_lines = read_lines(root / "image" / "testlist.txt")
    database_lines = read_lines(root / "image" / "list.txt")
    query_lines = read_lines(root / "query" / "list.txt")
    assert database_lines == train_lines  # the database is the training split
    assert query_lines == test_lines
    assert len(train_lines) == 5 * CLASSES and len(test_lines) == 3 * CLASSES
    # every generated image is there exactly once, with its label, in the split it came from
    train_table, test_table = lookup(*data["train"]), lookup(*data["test"])
    assert sorted(found_images(root / "image", train_lines, train_table)) == list(range(5 * CLASSES))
    assert sorted(found_images(root / "image", test_lines, test_table)) == list(range(3 * CLASSES))
    assert sorted(found_images(root / "query", query_lines, test_table)) == list(range(3 * CLASSES))
    # a query never finds itself: no query path, and no query image, is in the database
    assert not {path for path, _ in query_lines} & {path for path, _ in database_lines}
    database_pixels = {pixels(root / "image" / path).tobytes() for path, _ in database_lines}
    assert not any(pixels(root / "query" / path).tobytes() in database_pixels for path, _ in query_lines)
    # the list files are what the training and encoding stages read
    train_entries = MyDataset.read_list(root / "image" / "trainlist.txt", need_label=True)
    classes = MyDataset.training_classes(train_entries)
    assert classes == [str(label) for label in range(CLASSES)]
    test_entries = MyDataset.read_list(root / "image" / "testlist.txt", need_label=True)
    assert MyDataset.class_indices(test_entries, classes, "testlist").tolist() == [int(l) for _, l in test_lines]
    record = json.loads((root / "prepare_data.json").read_text())
    assert record["counts"]["train"] == 15 and record["counts"]["queries"] == 9
    assert record["classes"]["0"] == "T-shirt/top" and record["args"]["workers"] == 2


def test_rerun_same_files_and_refusals(tmp_path):
    fake_fashion_mnist(tmp_path / "source")
    root = tmp_path / "data"
    command = ("fashion-mnist", "--source", tmp_path / "source", "--data-root", root)
    ok(run_prepare(*command, "--workers", 2))
    first = snapshot(root)
    ok(run_prepare(*command, "--workers", 1))
    assert snapshot(root) == first  # same bytes, and nothing rewritten (mtimes kept)

    # another command into the same root: refused before anything is written
    error = one_line_error(run_prepare(*command, "--limit-per-class", 2))
    assert "trainlist.txt" in error and "--force" in error
    assert snapshot(root) == first
    ok(run_prepare(*command, "--limit-per-class", 2, "--force"))
    assert Counter(label for _, label in read_lines(root / "image" / "trainlist.txt")) == {"0": 2, "1": 2, "2": 2}

    # an image of the same name but other pixels is never overwritten silently either
    for name in ("trainlist.txt", "testlist.txt", "list.txt"):
        (root / "image" / name).unlink()
    (root / "query" / "list.txt").unlink()
    query_path = root / "query" / first_query_path(first)
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(query_path)
    error = one_line_error(run_prepare(*command))
    assert str(query_path) in error and "--force" in error
    ok(run_prepare(*command, "--force"))
    assert snapshot(root).keys() == first.keys()
    assert {path: data for path, (data, _) in snapshot(root).items()} == {p: d for p, (d, _) in first.items()}


def first_query_path(files):
    lines = files["query/list.txt"][0].decode().splitlines()
    return lines[0].split()[0]


def test_limits_take_the_first_images_of_each_class(tmp_path):
    data = fake_fashion_mnist(tmp_path / "source", gz=False)  # un-gzipped idx files are read too
    root = tmp_path / "data"
    ok(run_prepare("fashion-mnist", "--source", tmp_path / "source", "--data-root", root,
                   "--limit-per-class", 2, "--limit-test-per-class", 1, "--workers", 1))
    for split, folder, list_file, limit in (("train", "image", "image/trainlist.txt", 2),
                                            ("test", "query", "query/list.txt", 1)):
        images, labels = data[split]
        expected = sorted(i for label in range(CLASSES) for i in np.flatnonzero(labels == label)[:limit].tolist())
        found = found_images(root / folder, read_lines(root / list_file), lookup(images, labels))
        assert sorted(found) == expected
        assert found == sorted(found)  # listed in the order of the official split


def test_missing_source_and_failed_download_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, every request fails at once
    env = {**os.environ, "http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
           "no_proxy": "", "NO_PROXY": ""}
    result = run_prepare("fashion-mnist", "--source", tmp_path / "empty", "--data-root", tmp_path / "data",
                         "--download-dir", tmp_path / "download", env=env)
    error = one_line_error(result)
    assert "--source" in error and "dataset-fashion-mnist" in error
    assert not (tmp_path / "data" / "image" / "trainlist.txt").exists()


def test_corrupt_idx_file_is_one_line(tmp_path):
    fake_fashion_mnist(tmp_path / "source", gz=False)
    path = tmp_path / "source" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    error = one_line_error(run_prepare("fashion-mnist", "--source", tmp_path / "source", "--data-root", tmp_path / "d"))
    assert "train-images-idx3-ubyte" in error and "truncated" in error


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches


def cifar_row(image):
    """[32, 32, 3] -> the 3072 bytes of the official format: all red (row-major), then all green, then all blue."""
    return np.concatenate([image[:, :, channel].ravel() for channel in range(3)])


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    expected = {}
    for name in [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": np.stack([cifar_row(image) for image in images])}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
        split = "test" if name == "test_batch" else "train"
        expected.update({image.tobytes(): (split, str(label)) for image, label in zip(images, labels)})
    root = tmp_path / "data"
    result = ok(run_prepare("cifar10", "--source", tmp_path, "--data-root", root))  # finds cifar-10-batches-py below
    assert "airplane" in result.stdout
    seen = []
    for split, folder, list_file in (("train", "image", "image/trainlist.txt"), ("test", "query", "query/list.txt")):
        for path, label in read_lines(root / list_file):
            image = pixels(root / folder / path)
            assert image.shape == (32, 32, 3)
            assert expected[image.tobytes()] == (split, label)
            seen.append(image.tobytes())
    assert sorted(seen) == sorted(expected)


def test_cifar10_batch_that_is_not_data_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    error = one_line_error(run_prepare("cifar10", "--source", batches, "--data-root", tmp_path / "data"))
    assert "data_batch_1" in error
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------------------------
# A folder of class subfolders


def make_class_folder(folder, per_class=10):
    """PNG and JPEG images in three classes (one name with a space, one image nested), plus files to skip."""
    rng = np.random.default_rng(2)
    originals = {}
    for class_name in ("cat", "dog", "red fox"):
        for n in range(per_class):
            path = folder / class_name / ("nested" if n == 0 else "") / f"img {n}.{'png' if n % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)
            originals[path.read_bytes()] = class_name.replace(" ", "_")
        (folder / class_name / "notes.txt").write_text("not an image")
        (folder / class_name / ".hidden.png").write_bytes(b"not even a png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "loose.png")  # in no class: left out
    return originals


def test_folder_mode_seeded_split(tmp_path):
    originals = make_class_folder(tmp_path / "photos")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ok(run_prepare("folder", tmp_path / "photos", "--seed", seed, "--data-root", tmp_path / name, "--workers", 1))
        runs[name] = {list_file: (tmp_path / name / list_file).read_text() for list_file in
                      ("image/trainlist.txt", "image/testlist.txt", "image/list.txt", "query/list.txt")}
    assert runs["a"] == runs["b"]  # the same seed, the same split
    assert runs["a"]["image/testlist.txt"] != runs["c"]["image/testlist.txt"]  # another seed, another split

    root = tmp_path / "a"
    train_lines, query_lines = read_lines(root / "image" / "trainlist.txt"), read_lines(root / "query" / "list.txt")
    assert read_lines(root / "image" / "list.txt") == train_lines
    assert read_lines(root / "image" / "testlist.txt") == query_lines
    assert Counter(label for _, label in train_lines) == {"cat": 8, "dog": 8, "red_fox": 8}
    assert Counter(label for _, label in query_lines) == {"cat": 2, "dog": 2, "red_fox": 2}
    # every image copied byte for byte, once, with its class as label; queries are not in the database
    copied = [((root / "image" / path).read_bytes(), label) for path, label in train_lines]
    copied += [((root / "query" / path).read_bytes(), label) for path, label in query_lines]
    assert sorted(copied) == sorted(originals.items())
    assert not {path for path, _ in query_lines} & {path for path, _ in train_lines}
    record = json.loads((root / "prepare_data.json").read_text())
    assert record["classes"] == {"cat": "cat", "dog": "dog", "red_fox": "red fox"}


def test_folder_mode_keeps_a_given_split(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for class_name in ("a", "b"):
            for n in range(count):
                path = tmp_path / "set" / split / class_name / f"{n}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((4, 4), 10 * n, dtype=np.uint8)).save(path)
    root = tmp_path / "data"
    ok(run_prepare("folder", tmp_path / "set", "--data-root", root, "--workers", 1))
    assert read_lines(root / "image" / "trainlist.txt") == [(f"train/{c}/{n}.png", c) for c in "ab" for n in range(3)]
    assert read_lines(root / "query" / "list.txt") == [("test/a/0.png", "a"), ("test/b/0.png", "b")]


@pytest.mark.parametrize("args, words", [
    (("folder",), "PATH"),
    (("folder", "{tmp}", "--test-fraction", "1.5"), "--test-fraction"),
    (("folder", "{tmp}/missing"), "not a folder"),
])
def test_user_errors_are_one_line(tmp_path, args, words):
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert words in one_line_error(run_prepare(*args, "--data-root", tmp_path / "data"))
