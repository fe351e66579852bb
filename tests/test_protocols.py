"""prepare_data.py's benchmark protocols through the real command line, on fake copies of each layout.

The fakes have the protocols' real counts (the importers refuse any other), so NUS-WIDE's lists name 195,834
images: tiny PNGs, hard-linked to a few files so that making them takes seconds. CIFAR-10 is 60,000 generated
32x32 images in the official pickled batches.
"""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run
from fake_database import write_fake_database
from test_prepare_data import cifar_row, one_line_error, pixels

import MyDataset  # noqa: E402
import prepare_data  # noqa: E402

COUNTS = {  # queries, train, database, classes: HashNet's and DeepHash-pytorch's lists
    "nus-wide": (2100, 10500, 193734, 21),
    "coco": (5000, 10000, 117218, 80),
    "imagenet100": (5000, 10000, 128503, 100),
}
HASHNET_PREFIX = "/home/caozhangjie/run-czj/dataset/coco/"  # how HashNet's coco lists name their images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A source folder with images/<i>.jpg for i < 195,834 (PNG data: only the bytes matter here)."""
    source = tmp_path_factory.mktemp("source")
    (source / "images").mkdir()
    seeds = []
    for k in range(8):  # a file takes at most 65,000 hard links
        seeds.append(source / f".seed{k}.png")
        Image.new("RGB", (8, 8), (k, 0, 0)).save(seeds[-1])
    for i in range(sum(COUNTS["nus-wide"][:3:2])):
        os.link(seeds[i % 8], source / "images" / f"{i}.jpg")
    return source


def one_hot_rows(count, classes, rng, multi):
    """0/1 rows [count, classes]: one to three 1s a row (multi), or exactly one."""
    rows = np.zeros((count, classes), dtype=np.uint8)
    for row in rows:
        row[rng.choice(classes, size=rng.integers(1, 4) if multi else 1, replace=False)] = 1
    return rows


def write_lists(folder, dataset, prefix="images/", multi=True, seed=0):
    """database.txt, train.txt (drawn from the database) and test.txt; returns {role: (paths, rows)}."""
    queries, train, database, classes = COUNTS[dataset]
    rng = np.random.default_rng(seed)
    rows = one_hot_rows(database + queries, classes, rng, multi)
    paths = [f"{prefix}{i}.jpg" for i in range(database + queries)]
    picked = np.sort(rng.choice(database, size=train, replace=False))
    lists = {"database": (paths[:database], rows[:database]),
             "train": ([paths[i] for i in picked], rows[picked]),
             "test": (paths[database:], rows[database:])}
    folder.mkdir(parents=True, exist_ok=True)
    for role, (names, hot) in lists.items():
        text = "".join(f"{name} {' '.join(map(str, row))}\n" for name, row in zip(names, hot))
        (folder / f"{role}.txt").write_text(text, encoding="utf-8")
    return lists


def labels_of(hot_row):
    return tuple(str(c) for c in np.flatnonzero(hot_row))


def check_written(root, source, lists, dataset, topk, relevance):
    """The written lists name the source images by absolute path, with the source rows' labels; nothing copied."""
    written = {"database": root / "image/list.txt", "train": root / "image/trainlist.txt",
               "test": root / "query/list.txt"}
    for role, path in written.items():
        entries = MyDataset.read_list(path, need_label=True)
        names, hot = lists[role]
        assert [e.path for e in entries] == [str(source / name.split("coco/")[-1]) for name in names]
        assert [e.labels for e in entries] == [labels_of(row) for row in hot]
    assert (root / "image/testlist.txt").read_bytes() == (root / "query/list.txt").read_bytes()
    assert sorted(p.name for p in (root / "image").iterdir()) == ["list.txt", "testlist.txt", "trainlist.txt"]
    record = json.loads((root / "prepare_data.json").read_text())
    queries, train, database, classes = COUNTS[dataset]
    assert record["protocol"] == {"name": dataset, "queries": queries, "train": train, "database": database,
                                  "classes": classes, "relevance": relevance, "topk": topk}
    assert record["counts"]["database"] == database and record["counts"]["queries"] == queries
    return record


def prepare(*args):
    return run(REPO / "prepare_data.py", *args, "--workers", 1, check=False)


def test_nus_wide(images, tmp_path):
    lists = write_lists(tmp_path / "lists", "nus-wide")
    root = tmp_path / "data"
    result = prepare("nus-wide", "--source", images, "--lists", tmp_path / "lists", "--data-root", root)
    assert result.returncode == 0, result.stderr
    check_written(root, images, lists, "nus-wide", 5000, "shares at least one label")
    assert MyDataset.read_list(root / "image/list.txt", True).multi
    assert "protocol nus-wide: 2,100 queries, 10,500 training images, 193,734 database images" in result.stdout


def test_coco_with_hashnet_absolute_paths(images, tmp_path):
    """HashNet's lists name images by their authors' absolute paths: the missing leading folders are dropped."""
    lists = write_lists(tmp_path / "lists", "coco", prefix=HASHNET_PREFIX + "images/")
    root = tmp_path / "data"
    result = prepare("coco", "--source", images, "--lists", tmp_path / "lists", "--data-root", root)
    assert result.returncode == 0, result.stderr
    check_written(root, images, lists, "coco", 5000, "shares at least one label")


def test_imagenet100_is_single_label(images, tmp_path):
    """One 1 per row: an ordinary single-label data set, written `<path> <label>`."""
    lists = write_lists(images, "imagenet100", multi=False)  # beside the images: --lists defaults to --source
    root = tmp_path / "data"
    result = prepare("imagenet100", "--source", images, "--data-root", root)
    assert result.returncode == 0, result.stderr
    check_written(root, images, lists, "imagenet100", 1000, "same label")
    first = (root / "image/list.txt").read_text().splitlines()[0].split()
    assert first == [str(images / "images/0.jpg"), labels_of(lists["database"][1][0])[0]]
    assert not MyDataset.read_list(root / "image/list.txt", True).multi


def test_off_count_missing_image_and_wrong_columns_name_the_list(images, tmp_path):
    lists_dir = tmp_path / "lists"
    write_lists(lists_dir, "coco")
    test_lines = (lists_dir / "test.txt").read_text().splitlines(keepends=True)
    (lists_dir / "test.txt").write_text("".join(test_lines[:-1]))
    error = one_line_error(prepare("coco", "--source", images, "--lists", lists_dir, "--data-root", tmp_path / "d"))
    assert "test.txt" in error and "4,999 queries" in error and "5,000" in error
    (lists_dir / "test.txt").write_text("".join(test_lines[:-1]) + "images/no_such.jpg" + test_lines[-1][
        test_lines[-1].index(" "):])
    error = one_line_error(prepare("coco", "--source", images, "--lists", lists_dir, "--data-root", tmp_path / "d"))
    assert f"test.txt:{len(test_lines)}:" in error and "no_such.jpg is missing" in error
    error = one_line_error(prepare("nus-wide", "--source", images, "--lists", lists_dir, "--data-root", tmp_path / "d"))
    assert "80 one-hot columns" in error and "(21)" in error
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_check_counts_direct():
    protocol = {"name": "nus-wide", **prepare_data.PROTOCOLS["nus-wide"]}
    where = {"queries": "test.txt", "train": "train.txt", "database": "database.txt"}
    prepare_data.check_counts(protocol, {"queries": 2100, "train": 10500, "database": 193734}, where)
    with pytest.raises(prepare_data.UserError, match=r"database.txt gives 193,733 database images .* 193,734"):
        prepare_data.check_counts(protocol, {"queries": 2100, "train": 10500, "database": 193733}, where)


def test_protocol_flags_are_checked(tmp_path):
    for args, words in ((("coco",), "needs the local copy"), (("fashion-mnist", "--protocol", "dsh"), "is for cifar10"),
                        (("cifar10", "--protocol", "dsh", "--limit-per-class", "5"), "fixes its counts"),
                        (("folder", str(tmp_path), "--lists", str(tmp_path)), "--lists is for")):
        assert words in one_line_error(prepare(*args, "--data-root", tmp_path / "d"))


def test_prepare_data_imports_no_torch():
    result = run("-c", "import prepare_data, sys; assert 'torch' not in sys.modules")
    assert result.returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10, DSH's split


def fake_cifar(folder):
    """The six official batches, 60,000 images: image i has pixel (0, 0) = i in base 256 and label i % 10 in the
    training batches, so each class has 5,000 training and 1,000 test images. Returns (images, labels)."""
    folder.mkdir()
    index = np.arange(60000)
    images = np.zeros((60000, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = index // 65536, (index // 256) % 256, index % 256
    labels = (index % 10).tolist()
    for n, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows = slice(n * 10000, (n + 1) * 10000)
        data = np.stack([cifar_row(image) for image in images[rows]])
        batch = {b"batch_label": name.encode(), b"labels": labels[rows], b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return images, labels


def image_index(path):
    red, green, blue = (int(v) for v in pixels(path)[0, 0])
    return red * 65536 + green * 256 + blue


def test_cifar10_dsh(tmp_path):
    _, labels = fake_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "data"
    result = run(REPO / "prepare_data.py", "cifar10", "--protocol", "dsh", "--source", tmp_path / "cifar-10-batches-py",
                 "--data-root", root, "--workers", 2)
    assert '"protocol": "cifar10-dsh"' in result.stdout
    read = {name: [tuple(line.split()) for line in (root / path).read_text().splitlines()]
            for name, path in (("train", "image/trainlist.txt"), ("database", "image/list.txt"),
                               ("queries", "query/list.txt"))}
    assert {name: len(lines) for name, lines in read.items()} == {"train": 5000, "database": 59000, "queries": 1000}
    per_class = {name: np.bincount([int(label) for _, label in lines]).tolist() for name, lines in read.items()}
    assert per_class["train"] == [500] * 10 and per_class["queries"] == [100] * 10
    database, queries = {path for path, _ in read["database"]}, {path for path, _ in read["queries"]}
    assert {path for path, _ in read["train"]} <= database and not database & queries
    assert len(database | queries) == 60000  # every image is a query or in the database
    for folder, lines in (("query", read["queries"][::50]), ("image", read["database"][::2000])):
        for path, label in lines:  # the pixels of the image the name says, under its own label
            index = image_index(root / folder / path)
            assert path.startswith("test/" if index >= 50000 else "train/") and labels[index] == int(label)
    record = json.loads((root / "prepare_data.json").read_text())["protocol"]
    assert record["name"] == "cifar10-dsh" and record["topk"] is None and record["queries"] == 1000


def test_map_over_the_whole_ranking_when_the_protocol_says_so(tmp_path):
    """topk null in the protocol (cifar10 dsh): mAP.py's default k is every database item, so mAP@k = mAP."""
    write_fake_database(tmp_path / "database", num_db=120, num_query=20)
    meta = json.loads((tmp_path / "database/meta.json").read_text())
    meta["protocol"] = {"name": "cifar10-dsh", "topk": None}
    (tmp_path / "database/meta.json").write_text(json.dumps(meta))
    run(REPO / "mAP.py", "--bits", 16, "--device", "cpu", cwd=tmp_path)
    result = json.loads((tmp_path / "result/map_16bits.json").read_text())
    assert result["topk"] == 120 and result["protocol"] == "cifar10-dsh"
    assert result["map_topk"] == pytest.approx(result["map_all"], abs=1e-12)
    run(REPO / "mAP.py", "--bits", 16, "--device", "cpu", "--topk", 5, cwd=tmp_path)
    assert json.loads((tmp_path / "result/map_16bits.json").read_text())["topk"] == 5
