"""Multi-label data: list-file forms, training with sigmoid cross-entropy, multi-hot database labels, mAP.py.

The end-to-end run trains on a tiny generated set whose images carry one or two labels, then compares mAP.py with a
slow reference written here: relevant = shares at least one label, ties in the documented shuffle.
"""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, class_image, run

import MyDataset  # noqa: E402

# the module's trained runs are made once: every test of it on one pytest-xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("multilabel")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# List files


def test_label_and_comma_forms(tmp_path):
    entries = MyDataset.read_list(write(tmp_path / "a.txt", "x.png 3,1\ny.png 0\nz.png 1\nw.png 2,2\n"), True)
    assert entries.form == "labels" and entries.columns is None and entries.multi
    assert [e.labels for e in entries] == [("3", "1"), ("0",), ("1",), ("2",)]
    assert [e.label for e in entries] == ["3,1", "0", "1", "2"]
    assert MyDataset.training_classes(entries) == ["0", "1", "2", "3"]
    hot = MyDataset.multi_hot(entries, ["0", "1", "2", "3"], "a.txt")
    assert hot.tolist() == [[False, True, False, True], [True, False, False, False],
                            [False, True, False, False], [False, False, True, False]]


def test_single_label_lists_read_as_before(tmp_path):
    """`<path> 0` and `<path> 1` are single labels (one-hot needs two columns or more); nothing is multi-label."""
    entries = MyDataset.read_list(write(tmp_path / "a.txt", "x.png 1\ny.png 0\nz.png 0\n"), True)
    assert entries.form == "labels" and not entries.multi
    assert [(e.path, e.label, e.line) for e in entries] == [("x.png", "1", 1), ("y.png", "0", 2), ("z.png", "0", 3)]
    assert MyDataset.class_indices(entries, MyDataset.training_classes(entries), "a.txt").tolist() == [1, 0, 0]


def test_one_hot_form(tmp_path):
    entries = MyDataset.read_list(write(tmp_path / "a.txt", "x.png 0 1 1\ny.png 1 0 0\nz.png\n"), False)
    assert entries.form == "onehot" and entries.columns == 3 and entries.multi
    assert [e.labels for e in entries] == [("1", "2"), ("0",), ()]
    hot, every = MyDataset.retrieval_multi_hot(entries, ["0", "1"], {"z.png": ("5",)})
    assert every == ["0", "1", "2", "5"]
    assert hot.astype(int).tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]


def test_one_hot_rows_with_one_label_are_a_single_label_file(tmp_path):
    entries = MyDataset.read_list(write(tmp_path / "a.txt", "x.png 0 0 1\ny.png 1 0 0\n"), True)
    assert entries.form == "onehot" and not entries.multi
    assert [e.label for e in entries] == ["2", "0"]
    assert not MyDataset.is_multi_label(entries)


@pytest.mark.parametrize("text, words", [
    ("x.png 0 1 1\ny.png 1 0\n", [":2:", "2 one-hot columns", "line 1 has 3"]),
    ("x.png 3\ny.png 0 1\n", [":2:", "one-hot line", "'<path> <label>' lines", "one form"]),
    ("x.png 0 1\ny.png 4\n", [":2:", "'<path> <label>' line", "one-hot lines"]),
    ("x.png 0 0\n", [":1:", "no label"]),
    ("x.png a b\n", [":1:", "got 3 field(s)"]),
    ("x.png 2,\n", [":1:", "empty label"]),
])
def test_malformed_lists_name_the_line(tmp_path, text, words):
    with pytest.raises(MyDataset.UserError) as caught:
        MyDataset.read_list(write(tmp_path / "a.txt", text), True)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("cache", [True, False])
def test_image_source_serves_multi_hot_rows(tmp_path, cache):
    """Cached or streamed through DataLoader workers, a batch carries its images' multi-hot rows [B, C]."""
    rng = np.random.default_rng(0)
    for i in range(5):
        class_image(i % 3, rng).save(tmp_path / f"{i}.png")
    entries = [MyDataset.Entry(f"{i}.png", None, i + 1) for i in range(5)]
    hot = rng.random((5, 4)) < 0.5
    source = MyDataset.ImageSource(tmp_path, entries, hot, 64, "hot", workers=0, cache=cache)
    served = {}
    for images, labels, positions in source.batches(2, torch.Generator().manual_seed(0)):
        assert images.shape[0] == labels.shape[0] and labels.shape[1] == 4
        served.update({int(p): row for p, row in zip(positions, labels.tolist())})
    assert [served[i] for i in range(5)] == hot.astype(int).tolist()


def test_top1_correct_is_the_top_class_among_the_labels():
    import mytrain

    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    hot = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 0]])
    assert mytrain.top1_correct(logits, hot).item() == 2  # rows 0 and 2; row 3 has no label among the top
    assert mytrain.top1_correct(logits, torch.tensor([1, 0, 0, 1])).item() == 3


# ---------------------------------------------------------------------------------------------------------------
# End to end: train, encode, measure


def label_sets(count, classes, rng):
    """count label sets over classes: the first label is the one the image shows, every other image has a second."""
    sets = []
    for i in range(count):
        first = i % classes
        sets.append((first, (first + 1 + rng.integers(classes - 1)) % classes) if i % 2 else (first,))
    return sets


def make_multilabel_dataset(root, classes=3, train=72, test=18, query=12, seed=0):
    """data/ with comma-form training lists, a database of the training images plus two unlabelled ones, and a
    one-hot query list with one unlabelled query. Returns {list name: [label sets]} in list order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for name, folder, count in (("trainlist", "image", train), ("testlist", "image", test), ("query", "query", query)):
        sets = label_sets(count, classes, rng)
        lines = []
        for i, labels in enumerate(sets):
            path = f"{name}/{i}.png"
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            class_image(labels[0], rng).save(root / folder / path)
            if name == "query":
                lines.append(f"{path} {' '.join('1' if c in labels else '0' for c in range(classes))}\n")
            else:
                lines.append(f"{path} {','.join(map(str, labels))}\n")
        if name == "query":  # an unlabelled query: a row of zeros in the one-hot form
            class_image(0, rng).save(root / "query/query/none.png")
            lines.append("query/none.png " + " ".join("0" * classes) + "\n")
            sets.append(())
        write(root / folder / ("list.txt" if name == "query" else f"{name}.txt"), "".join(lines))
        expected[name] = sets
    # the database: training lines without their labels (taken from trainlist) and two unlabelled extra images
    for i in range(2):
        class_image(i, rng).save(root / "image/trainlist" / f"extra{i}.png")
    db_lines = [f"trainlist/{i}.png\n" for i in range(train)] + [f"trainlist/extra{i}.png\n" for i in range(2)]
    write(root / "image/list.txt", "".join(db_lines))
    expected["database"] = expected["trainlist"] + [(), ()]
    # the protocol record database.py carries to meta.json, whose k mAP.py takes for its default --topk
    write(root / "prepare_data.json", json.dumps({"protocol": {"name": "tiny", "topk": 7}}))
    return expected


def hot_rows(sets, classes):
    return np.array([[c in labels for c in range(classes)] for labels in sets], dtype=bool)


def reference_metrics(db_codes, db_hot, query_codes, query_hot, bits, topk):
    """Slow and plain: per query, rank the labelled database by Hamming distance, ties in the shuffle order."""
    take = np.flatnonzero(db_hot.any(1))
    db_bits = np.unpackbits(db_codes[take], axis=1)[:, :bits].astype(int)
    tie_position = np.empty(len(take), dtype=int)
    tie_position[np.random.default_rng(0).permutation(len(take))] = np.arange(len(take))
    ap_all, ap_k = [], []
    for code, labels in zip(query_codes, query_hot):
        if not labels.any():
            continue  # an unlabelled query takes no part
        distance = (db_bits != np.unpackbits(code)[:bits]).sum(1)
        order = sorted(range(len(take)), key=lambda i: (distance[i], tie_position[i]))
        relevant = [bool((db_hot[take[i]] & labels).any()) for i in order]
        aps = []
        for depth in (len(order), min(topk, len(order))):
            hits, total = 0, 0.0
            for rank, rel in enumerate(relevant[:depth], start=1):
                if rel:
                    hits += 1
                    total += hits / rank
            aps.append(total / hits if hits else 0.0)
        ap_all.append(aps[0])
        ap_k.append(aps[1])
    return float(np.mean(ap_all)), float(np.mean(ap_k)), len(ap_all), len(take)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    expected = make_multilabel_dataset(root / "data")
    run(REPO / "mytrain.py", "--bits", 16, "--pretrained", "none", "--img-size", 64, "--epochs", 4,
        "--batch-size", 16, "--device", "cpu", "--workers", 0, "--seed", 0, cwd=root)
    run(REPO / "database.py", "--bits", 16, "--device", "cpu", "--workers", 0, cwd=root)
    return root, expected


def test_training_records_the_multilabel_accuracy(multilabel_run):
    root, _ = multilabel_run
    model = next((root / "model").glob("16bits_*.pt"))
    checkpoint = torch.load(model, map_location="cpu", weights_only=True)
    assert checkpoint["label_kind"] == "multi" and "among the image's labels" in checkpoint["accuracy_definition"]
    assert checkpoint["model_args"]["classes"] == ["0", "1", "2"]
    assert checkpoint["test_accuracy"] >= 0.8  # the image shows its first label; a random guess is right ~1/2


def test_database_stores_multi_hot_labels(multilabel_run):
    root, expected = multilabel_run
    meta = json.loads((root / "database/meta.json").read_text())
    assert meta["label_kind"] == "multi" and meta["labels"] == ["0", "1", "2"] and meta["protocol"]["topk"] == 7
    assert not (root / "database/db_label.npy").exists()
    for part, name in (("db", "database"), ("query", "query")):
        stored = np.load(root / f"database/{part}_label_multihot.npy")
        assert stored.dtype == bool and np.array_equal(stored, hot_rows(expected[name], 3))


def test_map_equals_the_reference(multilabel_run):
    root, expected = multilabel_run
    run(REPO / "mAP.py", "--bits", 16, "--device", "cpu", cwd=root)
    result = json.loads((root / "result/map_16bits.json").read_text())
    folder = root / "database"
    map_all, map_k, queries, items = reference_metrics(
        np.load(folder / "db_binary.npy"), np.load(folder / "db_label_multihot.npy"),
        np.load(folder / "query_binary.npy"), np.load(folder / "query_label_multihot.npy"), 16, 7)
    assert result["topk"] == 7 and result["protocol"] == "tiny" and result["label_kind"] == "multi"
    assert (result["num_queries"], result["num_database"]) == (queries, items) == (12, 72)
    assert result["map_all"] == pytest.approx(map_all, abs=1e-6)
    assert result["map_topk"] == pytest.approx(map_k, abs=1e-6)
    assert map_all > 0.7  # chance: a random item shares a label with the query about 2/3 of the time


def test_query_and_demo_show_every_label(multilabel_run):
    root, expected = multilabel_run
    run(REPO / "query.py", "--bits", 16, "--device", "cpu", "--topk", 5, cwd=root)
    answer = json.loads((root / "result/query.json").read_text())
    names = (root / "database/db_names.txt").read_text().splitlines()
    truth = dict(zip(names, expected["database"]))
    for query, labels in zip(answer["queries"], expected["query"]):
        assert query["label"] == (",".join(map(str, sorted(labels))) or None)
        for found in query["results"]:
            assert found["label"] == (",".join(map(str, sorted(truth[found["name"]]))) or None)
    result = run(REPO / "demo.py", "--bits", 16, "--device", "cpu", "--num", 1, cwd=root)
    assert "share its label" in result.stdout and (root / "result/demo_1.png").is_file()


def test_mixed_forms_stop_training_with_the_line(tmp_path):
    root = tmp_path
    make_multilabel_dataset(root / "data")
    with open(root / "data/image/trainlist.txt", "a", encoding="utf-8") as f:
        f.write("trainlist/0.png 0 1 0\n")
    result = run(REPO / "mytrain.py", "--bits", 16, "--pretrained", "none", "--img-size", 64, "--epochs", 1,
                 "--device", "cpu", "--workers", 0, cwd=root, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trainlist.txt:73:" in result.stderr and "one form" in result.stderr
