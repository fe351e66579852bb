"""The first half of the pipeline through its real command lines: train, checkpoint, encode (the session's run)."""
import json
from pathlib import Path

import numpy as np
import torch

from conftest import REPO, TRAIN_FLAGS, make_dataset, run


def test_training_learns_and_names_the_model_by_accuracy(trained):
    models = sorted((trained / "model").glob("*.pt"))
    assert len(models) == 1 and models[0].name.startswith("16bits_")
    checkpoint = torch.load(models[0], map_location="cpu", weights_only=True)
    assert checkpoint["test_accuracy"] >= 0.9  # chance is 1/3
    assert models[0].name == f"16bits_{100 * checkpoint['test_accuracy']:.2f}.pt"
    epochs = [json.loads(line) for line in models[0].with_suffix(".jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 7))
    assert not list((trained / "model").glob("*.resume"))  # a finished run leaves no resume state


def test_checkpoint_shape_and_round_trip_with_weights_only(trained, tmp_path):
    import net

    path = next((trained / "model").glob("*.pt"))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {"format", "model_args", "model", "args", "epoch", "test_accuracy", "train_seconds", "pretrained",
            "device", "time"} == raw.keys()
    assert raw["model_args"] == {"bits": 16, "classes": ["0", "1", "2"], "img_size": 64, "recipe": "bnconv",
                                 "mean": list(net.IMAGENET_MEAN), "std": list(net.IMAGENET_STD), "dropout": 0.0}
    assert raw["pretrained"] == "none" and raw["epoch"] == 6 and raw["args"]["epochs"] == 6
    layers = {key.split(".")[0] for key in raw["model"]}
    assert layers == {"features", "fc6_fc7", "latent", "latent_norm", "classifier"}  # unwrapped, named layers
    model, checkpoint = net.load_model(path, bits=16)
    again = tmp_path / "again.pt"
    net.save_checkpoint(again, model, checkpoint["model_args"],
                        **{k: v for k, v in checkpoint.items() if k not in ("model", "model_args", "format")})
    reloaded, _ = net.load_model(again)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), reloaded(x)):
            assert torch.equal(a, b)


def test_second_run_never_overwrites(tmp_path):
    make_dataset(tmp_path / "data", classes=2, train_per_class=4, test_per_class=2, query_per_class=1)
    for _ in range(2):
        run(REPO / "mytrain.py", "--bits", 8, "--epochs", 1, *TRAIN_FLAGS, cwd=tmp_path)
    names = sorted(p.name for p in (tmp_path / "model").glob("*.pt"))
    assert len(names) == 2 and names[1] == names[0].replace(".pt", "_2.pt")  # same seed, same accuracy: a suffix


def test_database_files_have_the_documented_shapes(trained):
    root = trained
    db = root / "database"
    for part, count in (("db", 96), ("query", 15)):
        codes = np.load(db / f"{part}_binary.npy")
        labels = np.load(db / f"{part}_label.npy")
        features = np.load(db / f"{part}_feature.npy")
        names = (db / f"{part}_names.txt").read_text().splitlines()
        assert codes.dtype == np.uint8 and codes.shape == (count, 2)
        assert labels.dtype == np.int64 and labels.shape == (count,)
        assert features.dtype == np.float16 and features.shape == (count, 4096)
        assert len(names) == count
    meta = json.loads((db / "meta.json").read_text())
    assert meta["bits"] == 16 and meta["labels"] == ["0", "1", "2"] and len(meta["model_sha256"]) == 64
    names = (db / "db_names.txt").read_text().splitlines()
    listed = [line.split()[0] for line in (root / "data/image/list.txt").read_text().splitlines()]
    assert names == listed


def test_codes_match_the_model_thresholded_at_half(copy_trained):
    """The packed codes are sigmoid > 0.5 of the model on the eval transform, and the same on a second run."""
    import MyDataset
    import net

    root = copy_trained
    run(REPO / "database.py", "--bits", 16, "--device", "cpu", "--workers", 0, "--out", "db2", cwd=root)
    for name in ("db_binary.npy", "query_binary.npy", "db_feature.npy"):
        assert (root / "database" / name).read_bytes() == (root / "db2" / name).read_bytes()
    meta = json.loads((root / "db2/meta.json").read_text())
    model, checkpoint = net.load_model(meta["model"] if Path(meta["model"]).is_absolute() else root / meta["model"])
    query_names = (root / "db2/query_names.txt").read_text().splitlines()
    images = np.stack([np.asarray(MyDataset.read_image(root / "data/query" / n)) for n in query_names[:4]])
    args = checkpoint["model_args"]
    x = MyDataset.eval_transform(torch.from_numpy(images), 64, args["mean"], args["std"])
    with torch.no_grad():
        sigmoid, _, fc7 = model(x)
    expected = np.packbits((sigmoid > 0.5).numpy(), axis=1)
    assert np.array_equal(np.load(root / "db2/query_binary.npy")[:4], expected)
    np.testing.assert_allclose(np.load(root / "db2/query_feature.npy")[:4].astype(np.float32), fc7.numpy(),
                               rtol=1e-2, atol=1e-2)


def test_unseen_and_missing_labels_in_the_database(tmp_path):
    """list.txt lines without a label take it from trainlist; unseen labels get indices after the classes; -1."""
    import MyDataset

    entries = [MyDataset.Entry("a.png", None, 1), MyDataset.Entry("b.png", "zebra", 2),
               MyDataset.Entry("c.png", None, 3), MyDataset.Entry("d.png", "1", 4)]
    labels, every = MyDataset.retrieval_labels(entries, ["0", "1"], {"a.png": "0"})
    assert labels.tolist() == [0, 2, -1, 1] and every == ["0", "1", "zebra"]
    assert MyDataset.sort_labels(["10", "9", "2"]) == ["2", "9", "10"]
    assert MyDataset.sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_codes_separate_the_classes(trained, tmp_path):
    """A broken loss cannot land: the trained codes rank same-class items first (chance mAP is about 1/3)."""
    run(REPO / "mAP.py", "--bits", 16, "--database", trained / "database", "--result", "result", "--device", "cpu",
        cwd=tmp_path)
    metrics = json.loads((tmp_path / "result/map_16bits.json").read_text())
    assert metrics["num_queries"] == 15 and metrics["num_database"] == 96
    assert metrics["map_all"] >= 0.8 and metrics["precision_r2"] >= 0.8
