"""index.py and the --backend of query.py and demo.py: every backend against the exact scan, on generated codes with
many ties (few distinct codes, small integer fc7 features whose distances tie exactly).

faiss flat and Milvus BIN_FLAT must give query.txt byte for byte and query.json's results item for item; the IVFs
must find 99% of the exact results at the nprobe their self-check chose. Milvus runs as the real embedded server of
the `milvus` package, started once for the session (it picks free ports itself).

    python -m pytest -q tests/test_index.py
    bash tests/run.sh -k index              # with pytest-xdist (--dist loadgroup keeps the Milvus tests together)
"""
import json
import socket

import numpy as np
import pytest
from PIL import Image

from conftest import run
from fake_database import write_fake_database

BITS = 16


@pytest.fixture
def db_folder(tmp_path):
    """2,000 items from 2 prototypes x 4 classes, 30 queries, fc7 of 8 small integers: ties everywhere."""
    folder = tmp_path / "db"
    write_fake_database(folder, bits=BITS, num_db=2000, num_query=30, unlabelled_db=50, dim=8, per_class=2)
    return folder


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """The embedded Milvus server for the whole session, in a temporary folder; stopped at the end."""
    server_module = pytest.importorskip("milvus")
    with socket.socket() as sock:  # its embedded etcd always takes port 2380, whatever the other ports
        if sock.connect_ex(("127.0.0.1", 2380)) == 0:
            pytest.fail("port 2380 is taken (another embedded Milvus?): the embedded server cannot start")
    server = server_module.default_server
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus")))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def query(folder, result, *flags, check=True):
    return run("query.py", "--bits", BITS, "--database", folder, "--result", result, "--threads", 1, *flags,
               check=check)


def results_of(result):
    """(query.txt bytes, the queries of query.json, the backend it names)."""
    found = json.loads((result / "query.json").read_text())
    return (result / "query.txt").read_bytes(), found["queries"], found["backend"]


def reference_candidates(folder, radius, topk):
    """Slow reference: per query, r' (smallest radius >= radius holding >= topk items) and the items within it."""
    db_bits = np.unpackbits(np.load(folder / "db_binary.npy"), axis=1)
    out = []
    for code in np.unpackbits(np.load(folder / "query_binary.npy"), axis=1):
        distances = np.array([int(np.sum(code != item)) for item in db_bits])
        grown = next(r for r in range(BITS + 1) if np.sum(distances <= r) >= min(topk, len(db_bits)))
        used = max(radius, grown)
        out.append((used, int(np.sum(distances <= used))))
    return out


def recall(exact, approximate):
    """Share of the exact results (query, item) that the approximate backend returned too."""
    hits = total = 0
    for exact_query, found_query in zip(exact, approximate):
        want = {item["index"] for item in exact_query["results"]}
        hits += len(want & {item["index"] for item in found_query["results"]})
        total += len(want)
    return hits / total


def test_faiss_flat_gives_the_scans_results(db_folder, tmp_path):
    """One index, two sets of flags: the shuffled tie order with a radius of 1, and index order with 0."""
    all_flags = (("--topk", 200, "--radius", 1), ("--topk", 300, "--radius", 0, "--ties", "index"))
    for n, flags in enumerate(all_flags):
        query(db_folder, tmp_path / f"exact{n}", *flags)
    built = run("index.py", "--bits", BITS, "--database", db_folder)
    assert "recall@10 1.0" in built.stdout
    record = json.loads((db_folder / "meta.json").read_text())["index"]["faiss"]
    assert record["kind"] == "flat" and record["self_check"]["recall_radius"] == 1.0
    for n, flags in enumerate(all_flags):
        query(db_folder, tmp_path / f"faiss{n}", *flags)  # no --backend: the fresh faiss index
        text, queries, backend = results_of(tmp_path / f"faiss{n}")
        exact_text, exact_queries, exact_backend = results_of(tmp_path / f"exact{n}")
        assert (backend, exact_backend) == ("faiss flat", "exact")
        assert text == exact_text and queries == exact_queries
        radius, topk = flags[3], flags[1]
        assert [(q["radius"], q["candidates"]) for q in queries] == reference_candidates(db_folder, radius, topk)
        assert sum(q["radius"] > radius for q in queries) > 0  # r' grew for some: the growth path is covered


def test_faiss_ivf_recall_at_its_self_check_settings(db_folder, tmp_path):
    query(db_folder, tmp_path / "exact", "--topk", 20)
    built = run("index.py", "--bits", BITS, "--database", db_folder, "--kind", "ivf", "--check-topk", 20)
    check = json.loads((db_folder / "meta.json").read_text())["index"]["faiss"]
    assert check["nlist"] == min(round(4 * 2000 ** 0.5), 2000 // 39) and check["nprobe"] >= 1  # 39 per list
    assert min(check["self_check"]["recall_topk"], check["self_check"]["recall_radius"]) >= 0.99, built.stdout
    query(db_folder, tmp_path / "ivf", "--topk", 20, "--backend", "faiss")
    _, queries, backend = results_of(tmp_path / "ivf")
    assert backend == "faiss ivf"
    assert recall(results_of(tmp_path / "exact")[1], queries) >= 0.99


def test_stale_index_is_refused(db_folder, tmp_path):
    run("index.py", "--bits", BITS, "--database", db_folder)
    codes = np.load(db_folder / "db_binary.npy")
    codes[0] ^= 1
    np.save(db_folder / "db_binary.npy", codes)
    refused = query(db_folder, tmp_path / "r", "--backend", "faiss", check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "checksum" in refused.stderr and "python index.py --bits 16" in refused.stderr
    # with no --backend a stale index is passed over for the exact scan, saying so
    fallback = query(db_folder, tmp_path / "default")
    assert "index.py" in fallback.stderr and results_of(tmp_path / "default")[2] == "exact"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_milvus_is_one_line(db_folder, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (("index.py", "--bits", BITS, "--database", db_folder, "--backend", "milvus", "--uri", uri),
                    ("query.py", "--bits", BITS, "--database", db_folder, "--result", tmp_path, "--uri", uri)):
        result = run(*command, check=False)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and uri in result.stderr


@pytest.mark.xdist_group("milvus")  # one server per session, and a session per xdist worker: keep them on one
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_milvus_against_the_scan(db_folder, tmp_path, milvus_uri, kind):
    query(db_folder, tmp_path / "exact", "--topk", 25, "--radius", 1)
    collection = f"test_{kind}"
    run("index.py", "--bits", BITS, "--database", db_folder, "--backend", "milvus", "--uri", milvus_uri,
        "--collection", collection, "--kind", kind, "--check-topk", 25)
    record = json.loads((db_folder / "meta.json").read_text())["index"]["milvus"]
    assert record["collection"] == collection and record["uri"] == milvus_uri
    query(db_folder, tmp_path / "milvus", "--topk", 25, "--radius", 1, "--backend", "milvus")
    text, queries, backend = results_of(tmp_path / "milvus")
    exact_text, exact_queries, _ = results_of(tmp_path / "exact")
    assert backend == f"milvus {kind}"
    if kind == "flat":
        assert text == exact_text and queries == exact_queries
    else:
        assert min(record["self_check"]["recall_topk"], record["self_check"]["recall_radius"]) >= 0.99
        assert recall(exact_queries, queries) >= 0.99
    if kind == "ivf":
        return  # what follows is the same for both kinds: tested once
    # a rebuild replaces the collection this database made; another database's collection is refused
    run("index.py", "--bits", BITS, "--database", db_folder, "--backend", "milvus", "--uri", milvus_uri,
        "--collection", collection, "--kind", kind)
    other = tmp_path / "other"
    write_fake_database(other, bits=BITS, num_db=100, num_query=5, seed=1)
    refused = run("index.py", "--bits", BITS, "--database", other, "--backend", "milvus", "--uri", milvus_uri,
                  "--collection", collection, check=False)
    assert refused.returncode == 2 and collection in refused.stderr


def test_demo_same_figure_through_the_index(tmp_path):
    """demo.py end to end on a small database with images on disk: the same results with faiss as with the scan."""
    folder, data = tmp_path / "db", tmp_path / "data"
    write_fake_database(folder, bits=BITS, num_db=150, num_query=3, dim=8, per_class=2)
    rng = np.random.default_rng(0)
    for part, sub in (("db", "image"), ("query", "query")):
        for name in (folder / f"{part}_names.txt").read_text().split():
            (data / sub / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / sub / name)
    demo = ("demo.py", "--bits", BITS, "--database", folder, "--data-root", data, "--num", 1, "--topk", 6)
    exact = run(*demo, "--result", tmp_path / "exact", "--backend", "exact")
    run("index.py", "--bits", BITS, "--database", folder)
    faiss = run(*demo, "--result", tmp_path / "faiss")
    assert "(faiss flat)" in faiss.stdout
    lines = [out.stdout.strip().splitlines()[-1].split(";")[0] for out in (exact, faiss)]
    assert lines[0].replace("(exact)", "(faiss flat)") == lines[1]
    assert (tmp_path / "exact" / "demo_1.png").read_bytes() == (tmp_path / "faiss" / "demo_1.png").read_bytes()
