"""mAP.py, search.py, query.py and demo.py through their real command lines, on small generated databases."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import mAP
from conftest import REPO, TRAINED_BITS, run
from fake_database import write_fake_database

BITS = 16


@pytest.fixture
def workdir(tmp_path):
    """A run folder holding database/ (labels partly -1) and data/ with an image for every name."""
    parts = write_fake_database(tmp_path / "database", bits=BITS, num_db=120, num_query=12, num_classes=3,
                                unlabelled_db=4, unlabelled_query=2)
    rng = np.random.default_rng(0)
    for part, folder in (("db", "image"), ("query", "query")):
        for name in (tmp_path / "database" / f"{part}_names.txt").read_text().splitlines():
            path = tmp_path / "data" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
    return tmp_path, parts


def script(name):
    return REPO / name


def test_map_writes_the_metrics_of_the_module(workdir):
    root, parts = workdir
    run(script("mAP.py"), "--bits", BITS, "--topk", 50, cwd=root)
    result = json.loads((root / "result" / f"map_{BITS}bits.json").read_text())
    for key in ("map_all", "map_topk", "topk", "precision_r2", "recall_r2", "num_queries", "num_database", "ties",
                "model_sha256", "skipped_queries", "skipped_database", "curves", "args", "seconds"):
        assert key in result
    assert result["model_sha256"] is None and result["ties"] == "shuffle" and result["topk"] == 50
    assert (result["num_queries"], result["skipped_queries"]) == (10, 2)
    assert (result["num_database"], result["skipped_database"]) == (116, 4)
    (db_codes, db_labels, _), (q_codes, q_labels, _) = parts["db"], parts["query"]
    take = mAP.labelled(q_labels)
    want = mAP.evaluate(mAP.prepare_items(db_codes, BITS, db_labels, take=mAP.labelled(db_labels)), q_codes[take], q_labels[take], 50)
    assert result["map_all"] == pytest.approx(want["map_all"], rel=1e-12)
    assert result["map_topk"] == pytest.approx(want["map_topk"], rel=1e-12)
    assert len(result["curves"]["precision_at_k"]) == 116 and len(result["curves"]["pr"]["precision"]) == BITS + 1
    for figure in (f"pr_{BITS}bits.png", f"pk_{BITS}bits.png"):
        assert (root / "result" / figure).stat().st_size > 1000
    run(script("mAP.py"), "--bits", BITS, "--rerank", "--ties", "index", cwd=root)
    rerank = json.loads((root / "result" / f"map_{BITS}bits_rerank.json").read_text())
    assert rerank["rerank"] and rerank["ties"] == "index"
    assert rerank["precision_r2"] == pytest.approx(result["precision_r2"])  # a radius holds the same set
    assert (root / "result" / f"pk_{BITS}bits_rerank.png").is_file()
    assert not list((root / "result").glob(".*tmp"))


def test_search_recommends_by_its_rule_and_query_uses_it(workdir):
    root, _ = workdir
    result = run(script("search.py"), "--bits", BITS, "--max-radius", 6, "--time-queries", 3, cwd=root)
    assert "recommended" in result.stdout
    found = json.loads((root / "result" / f"search_{BITS}bits.json").read_text())
    rows = found["rows"]
    assert [row["radius"] for row in rows] == list(range(7))
    eligible = [row for row in rows if row["candidates"] >= 10]
    best = max(row["precision@10"] for row in eligible)
    assert found["recommended_radius"] == min(r["radius"] for r in eligible if r["precision@10"] >= best - 0.005)
    csv = (root / "result" / f"search_{BITS}bits.csv").read_text().splitlines()
    assert csv[0] == "radius,candidates,precision@10,mAP,ms/query" and len(csv) == 8
    assert (root / "result" / f"search_{BITS}bits.png").stat().st_size > 1000
    run(script("query.py"), "--bits", BITS, cwd=root)
    answer = json.loads((root / "result" / "query.json").read_text())
    assert answer["radius"] == found["recommended_radius"] and answer["radius_from"].endswith(f"search_{BITS}bits.json")


def test_query_writes_the_original_format_and_grows_the_radius(workdir):
    root, parts = workdir
    run(script("query.py"), "--bits", BITS, "--radius", 0, "--topk", 7, cwd=root)
    names = (root / "database" / "query_names.txt").read_text().splitlines()
    db_names = (root / "database" / "db_names.txt").read_text().splitlines()
    lines = (root / "result" / "query.txt").read_text().splitlines()
    assert len(lines) == len(names)  # every query, labelled or not
    answer = json.loads((root / "result" / "query.json").read_text())
    db_codes, _, _ = parts["db"]
    distances = mAP.hamming_distances(mAP.prepare_items(db_codes, BITS, ties="index"), parts["query"][0])  # database order
    for line, name, entry, row in zip(lines, names, answer["queries"], distances):
        head, tail = line.split(":", 1)
        assert head == name and tail.split(", ") == [r["name"] for r in entry["results"]]
        assert all(n in db_names for n in tail.split(", ")) and len(entry["results"]) == 7
        # r' is the smallest radius >= 0 holding 7 items, and every result lies within it
        assert np.count_nonzero(row <= entry["radius"]) >= 7
        assert entry["radius"] == 0 or np.count_nonzero(row <= entry["radius"] - 1) < 7
        assert entry["candidates"] == np.count_nonzero(row <= entry["radius"])
        assert all(r["hamming"] <= entry["radius"] for r in entry["results"])
        euclid = [r["euclidean"] for r in entry["results"]]
        assert euclid == sorted(euclid)
    assert any(entry["radius"] > 0 for entry in answer["queries"])


def test_query_topk_beyond_the_database_returns_all(workdir):
    root, _ = workdir
    run(script("query.py"), "--bits", BITS, "--topk", 500, "--radius", 1, cwd=root)
    answer = json.loads((root / "result" / "query.json").read_text())
    assert all(len(entry["results"]) == 120 and entry["radius"] <= BITS for entry in answer["queries"])


def test_demo_draws_a_query_and_its_results(workdir):
    root, _ = workdir
    result = run(script("demo.py"), "--bits", BITS, "--num", 3, cwd=root)
    assert (root / "result" / "demo_3.png").stat().st_size > 5000
    assert "share its label" in result.stdout
    failed = run(script("demo.py"), "--bits", BITS, "--num", 12, cwd=root, check=False)
    assert failed.returncode == 2 and "--num 12" in failed.stderr
    shutil.rmtree(root / "data" / "image")
    failed = run(script("demo.py"), "--bits", BITS, "--num", 0, cwd=root, check=False)
    assert failed.returncode == 2 and "--data-root" in failed.stderr


def test_demo_titles_name_the_classes_prepare_data_recorded(tmp_path):
    import database

    meta = {"labels": ["0", "1", "bird"]}
    (tmp_path / "prepare_data.json").write_text(json.dumps({"classes": {"0": "T-shirt/top", "1": "Trouser"}}))
    names = database.class_names(tmp_path)
    assert [database.label_text(meta, label, names) for label in (0, 1, 2, -1, 7)] == \
        ["T-shirt/top", "Trouser", "bird", None, None]
    assert database.label_text(meta, np.array([1, 0, 1], dtype=np.uint8), names) == "T-shirt/top,bird"
    assert database.class_names(tmp_path / "absent") == {} and database.label_text(meta, 1) == "1"


@pytest.mark.parametrize("name", ("mAP.py", "search.py"))
def test_metrics_refuse_a_database_without_labels(tmp_path, name):
    write_fake_database(tmp_path / "database", bits=BITS, num_db=20, num_query=4, unlabelled_db=20)
    result = run(script(name), "--bits", BITS, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "db_label.npy has a label" in result.stderr


def test_query_flags_are_checked(workdir):
    root, _ = workdir
    for flags, message in ((["--radius", 17], "--radius 17"), (["--topk", 0], "argument --topk: must be an integer at least 1, got 0"),
                           (["--image", "nowhere.png"], "no such file")):
        result = run(script("query.py"), "--bits", BITS, *flags, cwd=root, check=False)
        assert result.returncode == 2 and message in result.stderr
    (root / "empty").mkdir()
    result = run(script("query.py"), "--bits", BITS, "--image", root / "empty", cwd=root, check=False)
    assert result.returncode == 2 and "no image file" in result.stderr


def test_query_refuses_an_empty_database(tmp_path):
    write_fake_database(tmp_path / "database", bits=BITS, num_db=0, num_query=3)
    result = run(script("query.py"), "--bits", BITS, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "holds no database item" in result.stderr


def test_the_search_benchmark_runs_and_checks_itself(tmp_path):
    """bench/search.py at a hundredth of its sizes: it measures (no time is asserted here) and its checks hold."""
    run(REPO / "bench" / "search.py", "--scale", 0.01, "--baseline-queries", 5, "--skip-faiss", "--result", tmp_path)
    found = json.loads((tmp_path / "bench_search.json").read_text())
    assert found["map"]["agrees_with_stable_argsort"] and found["map"]["script_map_all_equal"]
    assert found["map"]["queries"] == 100 and found["topk"]["database"] == 10_000


# ---------------------------------------------------------------------------------------------------------------
# Query by image, with a real (tiny) model


def test_query_by_image_finds_the_database_image_itself(copy_trained):
    """On the session's trained model and its database (tests/conftest.py)."""
    root = copy_trained
    names = (root / "database" / "db_names.txt").read_text().splitlines()
    picked = [root / "data" / "image" / names[5], root / "data" / "image" / names[30]]
    run(script("query.py"), "--bits", TRAINED_BITS, "--device", "cpu", "--image", *picked, cwd=root)
    answer = json.loads((root / "result" / "query_images.json").read_text())
    lines = (root / "result" / "query_images.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{picked[0]}:")
    for entry, index in zip(answer["queries"], (5, 30)):
        best = entry["results"][0]
        # the same pixels through the same model: Hamming 0 and fc7 distance 0 (fp16 rounding aside)
        assert best["hamming"] == 0 and best["euclidean"] < 1e-2
        assert entry["results"][0]["index"] == index or entry["results"][1]["euclidean"] < 1e-2
    run(script("query.py"), "--bits", TRAINED_BITS, "--device", "cpu", "--image", root / "data" / "query", cwd=root)
    answer = json.loads((root / "result" / "query_images.json").read_text())
    assert answer["num_queries"] == 15
    run(script("demo.py"), "--bits", TRAINED_BITS, "--device", "cpu", "--image", picked[1], cwd=root)
    assert (root / "result" / f"demo_{picked[1].stem}.png").stat().st_size > 5000
