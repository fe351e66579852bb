"""Bad input, faults and untrusted files (issue 6), each provoked through the real command lines.

Every refused case must end with exit status 2 and exactly one line on stderr naming the file, line or flag, and no
traceback. The runs here use tiny generated data (2 classes, 64 px, 1-3 epochs, CPU); progress bars are switched
off (TQDM_DISABLE) so that stderr holds only what the scripts say, and Python warnings are on as for a user.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TRAINED_BITS as BITS, class_image, make_dataset, run

sys.path.insert(0, str(REPO))

import database  # noqa: E402  (after the path is set)
import MyDataset  # noqa: E402
from stage import UserError  # noqa: E402

QUIET = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "default"}
TRAIN = ("--bits", 8, "--pretrained", "none", "--img-size", 64, "--epochs", 1, "--batch-size", 8, "--device", "cpu",
         "--workers", 0, "--seed", 0)


def small_dataset(root):
    """16 training, 4 test and 4 query images of 2 generated classes, under root/data."""
    return make_dataset(Path(root) / "data", classes=2, train_per_class=8, test_per_class=2, query_per_class=2)


def train(root, *extra, env=None):
    return run(REPO / "mytrain.py", *TRAIN, *extra, cwd=root, check=False, env={**QUIET, **(env or {})})


def encode(root, *extra, env=None):
    return run(REPO / "database.py", "--bits", BITS, "--device", "cpu", "--workers", 0, "--batch-size", 8, *extra,
               cwd=root, check=False, env={**QUIET, **(env or {})})


def succeeds(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    return result


def fails(result, *names):
    """Exit status 2, one line on stderr that names each of names, no traceback; returns that line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def no_epoch_ran(result):
    assert '"epoch"' not in result.stdout, "training started before the input was checked"


def append_line(list_path, line):
    with open(list_path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def noise_image(path, size=64, seed=0):
    """An image of noise: big enough that its data runs well past the header, so a cut lands in the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_bad_image(path, kind, size=64):
    """A broken image file of one kind: missing, empty, not an image, or a PNG/JPEG (size x size) cut off in its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-an-image":
        path.write_text("this is a text file, not an image\n")
    elif kind.startswith("truncated"):
        noise_image(path, size)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) * 2 // 3])
        with Image.open(path) as image:  # the header still reads: only decoding can find the fault
            assert image.size == (size, size)
    else:
        assert kind == "missing"


BAD_KINDS = {"missing": "bad/missing.png", "empty": "bad/empty.png", "not-an-image": "bad/text.png",
             "truncated-png": "bad/cut.png", "truncated-jpeg": "bad/cut.jpg"}


@pytest.fixture
def with_model(tmp_path, trained):
    """A fresh root with the small data set and a copy of the session's 16-bit model (tests may damage either)."""
    small_dataset(tmp_path)
    shutil.copytree(trained / "model", tmp_path / "model")
    return tmp_path


@pytest.fixture(scope="module")
def built(tmp_path_factory, trained):
    """A root holding the small data set, the session's model and a database built from them."""
    root = tmp_path_factory.mktemp("built")
    small_dataset(root)
    shutil.copytree(trained / "model", root / "model")
    succeeds(encode(root))
    return root


# ---------------------------------------------------------------------------------------------------------------
# List files


@pytest.mark.parametrize("case", ["missing", "empty", "blank-only"])
def test_missing_or_empty_trainlist_is_named(tmp_path, case):
    small_dataset(tmp_path)
    trainlist = tmp_path / "data/image/trainlist.txt"
    if case == "missing":
        trainlist.unlink()
    else:
        trainlist.write_text("" if case == "empty" else "\ufeff\n   \r\n\n")
    line = fails(train(tmp_path), trainlist.relative_to(tmp_path))
    assert ("does not exist" if case == "missing" else "no entries") in line


@pytest.mark.parametrize("list_name, bad_line, line_number", [
    ("trainlist.txt", "trainlist/c0_0.png 0 extra", 17),  # three fields
    ("testlist.txt", "testlist/c0_0.png", 5),  # a path without its label
])
def test_a_line_with_the_wrong_number_of_fields_names_file_and_line(tmp_path, list_name, bad_line, line_number):
    small_dataset(tmp_path)
    append_line(tmp_path / "data/image" / list_name, bad_line)
    fails(train(tmp_path), f"data/image/{list_name}:{line_number}:")


def test_a_database_list_line_with_too_many_fields_names_file_and_line(with_model):
    list_path = with_model / "data/image/list.txt"
    lines = list_path.read_text().splitlines()
    lines.insert(3, "trainlist/c0_3.png 0 surplus")
    list_path.write_text("\n".join(lines) + "\n")
    fails(encode(with_model), "data/image/list.txt:4:")


def test_a_testlist_label_training_never_saw_is_refused(tmp_path):
    small_dataset(tmp_path)
    shutil.copy(tmp_path / "data/image/testlist/c0_0.png", tmp_path / "data/image/testlist/z.png")
    append_line(tmp_path / "data/image/testlist.txt", "testlist/z.png zebra")
    line = fails(train(tmp_path), "data/image/testlist.txt:5:", "'zebra'")
    assert "training" in line


def test_list_quirks_are_accepted_and_duplicates_warned(tmp_path):
    """Blank lines, trailing spaces, CRLF, a BOM and non-ASCII names train and encode; duplicates are counted.

    The same runs audit every file the scripts open for writing: each must go to a temporary name first.
    """
    small_dataset(tmp_path)
    image_dir = tmp_path / "data/image"
    (image_dir / "trainlist/c0_0.png").rename(image_dir / "trainlist/ß_ünïcödé.png")
    shutil.copy(image_dir / "trainlist/c1_0.png", image_dir / "trainlist/猫.png")
    entries = [line.split() for line in (image_dir / "trainlist.txt").read_text().splitlines()]
    entries[0] = ["trainlist/ß_ünïcödé.png", "0"]
    entries.append(["trainlist/猫.png", "1"])
    entries += [entries[1], entries[2]]  # two duplicates
    quirky = "\ufeff" + "".join(f"{path} {label}  \r\n" + ("\r\n   \r\n" if i % 5 == 0 else "")
                                for i, (path, label) in enumerate(entries))
    (image_dir / "trainlist.txt").write_bytes(quirky.encode("utf-8"))
    (image_dir / "list.txt").write_bytes(quirky.encode("utf-8"))
    testlist = (image_dir / "testlist.txt").read_text().splitlines()
    (image_dir / "testlist.txt").write_bytes(("\ufeff\n" + "\t\r\n".join(testlist) + "\r\n").encode("utf-8"))

    audit = audit_env(tmp_path)
    result = succeeds(train(tmp_path, env=audit))
    assert result.stderr.count("warning:") == 1
    assert "data/image/trainlist.txt: 2 duplicate path(s)" in result.stderr
    assert "test_accuracy" in result.stdout
    result = succeeds(encode(tmp_path, "--bits", 8, env=audit))  # the 8-bit model this test trained
    assert "data/image/list.txt: 2 duplicate path(s)" in result.stderr
    names = (tmp_path / "database/db_names.txt").read_text(encoding="utf-8").splitlines()
    assert names == [path for path, _ in entries]
    assert np.load(tmp_path / "database/db_label.npy").tolist() == [int(label) for _, label in entries]
    assert_writes_were_atomic(tmp_path)


def test_a_list_file_that_is_not_utf8_is_named(tmp_path):
    small_dataset(tmp_path)
    (tmp_path / "data/image/testlist.txt").write_bytes("testlist/c0_0.png caf\xe9\n".encode("latin-1"))
    fails(train(tmp_path), "data/image/testlist.txt", "UTF-8")


# ---------------------------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_training_image_last_in_the_list_fails_before_the_first_epoch(tmp_path, kind):
    small_dataset(tmp_path)
    name = BAD_KINDS[kind]
    write_bad_image(tmp_path / "data/image" / name, kind)
    append_line(tmp_path / "data/image/trainlist.txt", f"{name} 1")
    result = train(tmp_path)
    line = fails(result, f"data/image/{name}", "--skip-bad")
    no_epoch_ran(result)
    expected = {"missing": "not found", "empty": "empty", "not-an-image": "not a readable image",
                "truncated-png": "cannot be decoded", "truncated-jpeg": "cannot be decoded"}[kind]
    assert expected in line


def test_a_bad_test_image_fails_before_the_training_list_is_decoded(tmp_path):
    """Every header of every list is read before any list is decoded: the cheap check comes first."""
    small_dataset(tmp_path)
    append_line(tmp_path / "data/image/testlist.txt", "testlist/gone.png 0")
    result = train(tmp_path)
    fails(result, "data/image/testlist/gone.png", "line 5")
    assert not list((tmp_path / "data/image/.cache").glob("trainlist_*.npy"))  # no decode was started


def test_a_bad_query_image_fails_before_the_database_is_decoded_or_encoded(with_model):
    append_line(with_model / "data/query/list.txt", "query/gone.png 0")
    fails(encode(with_model), "data/query/query/gone.png", "line 5")
    assert not list((with_model / "data/image/.cache").glob("db_list_*.npy"))
    assert not (with_model / "database").exists()


def test_an_image_broken_further_in_fails_when_decoded_while_streaming(tmp_path):
    """With --no-cache nothing is decoded up front: the header passes and the decode names the file."""
    small_dataset(tmp_path)
    write_bad_image(tmp_path / "data/image/bad/cut.png", "truncated-png")
    append_line(tmp_path / "data/image/trainlist.txt", "bad/cut.png 0")
    result = train(tmp_path, "--no-cache")
    fails(result, "data/image/bad/cut.png", "cannot be decoded")
    no_epoch_ran(result)


@pytest.mark.parametrize("streaming", [(), ("--no-cache",)], ids=["cache", "no-cache"])
def test_skip_bad_encodes_past_every_kind_of_bad_image_and_lists_them(with_model, streaming):
    """Truncated images pass the header check and are found when decoded: up front, or while streaming."""
    image_dir, query_dir = with_model / "data/image", with_model / "data/query"
    for kind, name in BAD_KINDS.items():
        folder = query_dir if kind in ("empty", "truncated-png") else image_dir
        # the good images' size: a header of another size would change the size every image is cached at
        write_bad_image(folder / name, kind, size=32)
        lines = (folder / "list.txt").read_text().splitlines()
        lines.insert(1, f"{name} 1")  # among good ones: the codes of the rest must keep their own rows
        (folder / "list.txt").write_text("\n".join(lines) + "\n")
    # one image a batch: each code then comes from the same arithmetic in both runs, whatever its neighbours
    result = succeeds(encode(with_model, "--skip-bad", "--batch-size", 1, *streaming))
    assert "skipped 5 unreadable image(s)" in result.stdout
    bad_lines = (with_model / "result/bad_images.txt").read_text().splitlines()
    assert len(bad_lines) == 5
    for kind, name in BAD_KINDS.items():
        assert sum(name in line for line in bad_lines) == 1, (name, bad_lines)
    db_names = (with_model / "database/db_names.txt").read_text().splitlines()
    query_names = (with_model / "database/query_names.txt").read_text().splitlines()
    assert len(db_names) == 16 and len(query_names) == 4
    assert not any(name.startswith("bad/") for name in db_names + query_names)
    db, query, meta = database.load_database(with_model / "database", BITS)
    assert len(db.codes) == 16 and len(query.codes) == 4 and meta["skipped_bad"] == 5
    clean = with_model / "clean"  # the same good images alone give the same codes, row for row
    shutil.copytree(with_model / "data", clean / "data")
    shutil.copytree(with_model / "model", clean / "model")
    for folder in ("data/image", "data/query"):
        lines = (clean / folder / "list.txt").read_text().splitlines()
        (clean / folder / "list.txt").write_text("".join(f"{line}\n" for line in lines if not line.startswith("bad/")))
    succeeds(encode(clean, "--batch-size", 1))
    for name in ("db_binary.npy", "query_binary.npy", "db_label.npy", "query_label.npy", "db_names.txt"):
        assert (with_model / "database" / name).read_bytes() == (clean / "database" / name).read_bytes(), name


@pytest.mark.parametrize("streaming", [(), ("--no-cache",)], ids=["cache", "no-cache"])
def test_skip_bad_trains_past_bad_images_and_lists_them(tmp_path, streaming):
    small_dataset(tmp_path)
    for kind in ("missing", "truncated-jpeg"):
        write_bad_image(tmp_path / "data/image" / BAD_KINDS[kind], kind)
        append_line(tmp_path / "data/image/trainlist.txt", f"{BAD_KINDS[kind]} 0")
    result = succeeds(train(tmp_path, "--skip-bad", *streaming))
    assert "skipped 2 unreadable image(s)" in result.stdout and "test_accuracy" in result.stdout
    bad_lines = (tmp_path / "result/bad_images.txt").read_text().splitlines()
    assert len(bad_lines) == 2 and "missing.png" in bad_lines[0] + bad_lines[1] and "cut.jpg" in "".join(bad_lines)


def test_a_streamed_pass_reports_images_that_break_late_and_the_source_stays_as_made(tmp_path):
    """ImageSource never changes after it is made: each pass lists what it found broken, and callers report that."""
    small_dataset(tmp_path)
    folder = tmp_path / "data/image"
    write_bad_image(folder / BAD_KINDS["truncated-png"], "truncated-png")
    append_line(folder / "trainlist.txt", f"{BAD_KINDS['truncated-png']} 1")
    entries = MyDataset.read_list(folder / "trainlist.txt", need_label=True)
    labels = np.arange(len(entries)) % 2
    source = MyDataset.ImageSource(folder, entries, labels, 64, "trainlist", workers=0, skip_bad=True, cache=False)
    keep_before = source.keep.copy()
    assert len(source) == 17 and source.bad == []  # its header reads: only decoding finds the fault
    for _ in range(2):
        batches = source.batches(5)
        seen = [int(i) for _, _, positions in batches for i in positions]
        assert sorted(seen) == list(range(16))  # positions index source.keep; the broken one (last) is left out
        assert [i for i, _ in batches.bad] == [16] and "bad/cut.png: cannot be decoded" in batches.bad[0][1]
        assert np.array_equal(source.keep, keep_before) and source.bad == [] and len(source) == 17


def exif_rotated(upright):
    """The pixels of upright stored turned a quarter anticlockwise, with EXIF orientation 6 to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    return upright.transpose(Image.Transpose.ROTATE_90), exif


def test_read_image_converts_every_mode_to_rgb_and_applies_exif_rotation(tmp_path):
    """Compared with what each pixel obviously must become."""
    grey = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8))
    grey.save(tmp_path / "grey.png")
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    palette.save(tmp_path / "palette.png")
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (77, 128)).save(tmp_path / "la.png")
    Image.fromarray(np.array([[0, 65535], [32896, 40000]], dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")  # really 16-bit on disk
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"

    def pixels(name):
        image = MyDataset.read_image(tmp_path / name)
        assert image.mode == "RGB"
        return np.asarray(image).astype(int)

    assert pixels("grey.png")[:, :, 0].tolist() == [[0, 100], [200, 255]] and np.ptp(pixels("grey.png"), axis=2).max() == 0
    assert pixels("palette.png").tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 255, 0], [255, 0, 0]]]
    assert (pixels("rgba.png") == [10, 20, 30]).all()
    assert (pixels("la.png") == 77).all()
    assert pixels("grey16.png")[:, :, 0].tolist() == [[0, 255], [128, 155]]  # scaled by 255/65535, not clipped
    assert (np.abs(pixels("cmyk.jpg") - [0, 255, 255]) <= 3).all()  # pure cyan

    upright = np.zeros((40, 20, 3), dtype=np.uint8)  # 20 wide, 40 tall: red above, blue below
    upright[:20, :, 0] = 255
    upright[20:, :, 2] = 255
    for suffix in (".png", ".jpg"):
        stored, exif = exif_rotated(Image.fromarray(upright))
        stored.save(tmp_path / f"rotated{suffix}", exif=exif)
        assert MyDataset.image_header(tmp_path / f"rotated{suffix}") == (40, 20)  # stored sideways
        seen = pixels(f"rotated{suffix}")
        assert seen.shape == (40, 20, 3)
        assert (np.abs(seen[4:16, 4:16] - [255, 0, 0]) <= 16).all() and (np.abs(seen[24:36, 4:16] - [0, 0, 255]) <= 16).all()


def test_odd_image_modes_encode_and_exif_rotation_reaches_the_codes(with_model):
    """database.py accepts every mode; an EXIF-rotated file encodes exactly like its upright twin."""
    query_dir = with_model / "data/query"
    upright = np.asarray(class_image(1, np.random.default_rng(5), size=32))
    upright = np.concatenate([upright, upright[::-1]], axis=0)  # 32 wide, 64 tall, not symmetric under a turn
    Image.fromarray(upright).save(query_dir / "upright.png")
    stored, exif = exif_rotated(Image.fromarray(upright))
    stored.save(query_dir / "rotated_exif.png", exif=exif)
    stored.save(query_dir / "rotated_plain.png")
    rgb = Image.fromarray(upright)
    rgb.convert("L").save(query_dir / "grey.png")
    rgb.convert("P").save(query_dir / "palette.png")
    rgb.convert("RGBA").save(query_dir / "rgba.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(query_dir / "grey16.png")
    rgb.convert("CMYK").save(query_dir / "cmyk.jpg")
    odd = ["upright.png", "rotated_exif.png", "rotated_plain.png", "grey.png", "palette.png", "rgba.png",
           "grey16.png", "cmyk.jpg"]
    (query_dir / "list.txt").write_text("".join(f"{name} 1\n" for name in odd))
    succeeds(encode(with_model))
    assert (with_model / "database/query_names.txt").read_text().splitlines() == odd
    features = np.load(with_model / "database/query_feature.npy")
    codes = np.load(with_model / "database/query_binary.npy")
    assert np.array_equal(codes[0], codes[1])  # the EXIF-rotated twin hashes like the upright image
    exif_gap = np.abs(features[0].astype(np.float32) - features[1]).max()
    plain_gap = np.abs(features[0].astype(np.float32) - features[2]).max()
    assert exif_gap <= 1e-3 * plain_gap, (exif_gap, plain_gap)  # without the EXIF tag the picture really is turned
    assert np.isfinite(features.astype(np.float32)).all()


# ---------------------------------------------------------------------------------------------------------------
# Model files: nothing in them is ever run


class CreatesMarker:
    """Unpickling this calls os.system: a loader that runs pickles would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(folder):
    """A torch.save zip and a bare pickle that each create folder/PWNED when loaded unsafely."""
    marker = folder / "PWNED"
    torch.save({"bits": 8, "state_dict": {}, "payload": CreatesMarker(marker)}, folder / "evil.pt")
    (folder / "evil.pkl").write_bytes(pickle.dumps(CreatesMarker(marker)))
    return marker


@pytest.mark.parametrize("name", ["evil.pt", "evil.pkl"])
def test_a_malicious_model_file_is_refused_and_never_runs(with_model, name):
    marker = malicious_files(with_model)
    # the marker really would appear if anything unpickled the file unsafely
    assert not marker.exists()
    line = fails(encode(with_model, "--model", name), name)
    assert "refused" in line
    assert not marker.exists()


def test_a_malicious_pretrained_file_is_refused_and_never_runs(tmp_path):
    small_dataset(tmp_path)
    marker = malicious_files(tmp_path)
    fails(train(tmp_path, "--pretrained", "evil.pt"), "evil.pt", "refused")
    assert not marker.exists()


def test_a_malicious_resume_file_is_refused_and_never_runs(tmp_path):
    small_dataset(tmp_path)
    marker = malicious_files(tmp_path)
    (tmp_path / "model").mkdir()
    shutil.copy(tmp_path / "evil.pt", tmp_path / "model/8bits_20250101-000000.resume")
    fails(train(tmp_path, "--resume"), "model/8bits_20250101-000000.resume", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "plain-state-dict", "dict-with-bits"])
def test_a_model_file_that_is_not_a_checkpoint_is_named(with_model, case):
    path = with_model / "model/16bits_99.00.pt"
    real = next((with_model / "model").glob("16bits_*.pt")).read_bytes()
    if case == "text":
        path.write_text("<html>404 not found</html>\n")
    elif case == "truncated":
        path.write_bytes(real[:len(real) // 2])
    elif case == "plain-state-dict":
        torch.save({"features.0.weight": torch.zeros(2)}, path)
    elif case == "dict-with-bits":
        torch.save({"bits": 8, "state_dict": {}}, path)
    line = fails(encode(with_model, "--model", path.relative_to(with_model)), "model/16bits_99.00.pt")
    assert ("does not exist" if case == "missing" else "not a checkpoint written by mytrain.py") in line


def test_bits_that_do_not_match_the_model_are_refused(with_model):
    model = next((with_model / "model").glob("16bits_*.pt")).relative_to(with_model)
    fails(encode(with_model, "--model", model, "--bits", 8), model, "--bits 8", "--bits 16")


def test_debug_shows_the_traceback(with_model):
    result = encode(with_model, "--model", "nothere.pt", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The database reader: stale or damaged files are never used silently


@pytest.fixture
def db_copy(tmp_path, built):
    shutil.copytree(built / "database", tmp_path / "database")
    return tmp_path / "database"


def refused(folder, *names, bits=BITS, features=True):
    with pytest.raises(UserError) as caught:
        database.load_database(folder, bits, features=features)
    message = str(caught.value)
    assert "\n" not in message and "python database.py --bits" in message
    for name in names:
        assert str(name) in message, message
    return message


def test_the_database_loads(db_copy):
    db, query, meta = database.load_database(db_copy, BITS, features=True)
    assert len(db.codes) == len(db.labels) == len(db.names) == len(db.features) == 16
    assert len(query.codes) == 4 and meta["bits"] == BITS


def test_a_missing_database_or_file_is_named(db_copy):
    refused(db_copy.parent / "nowhere", "nowhere")
    (db_copy / "query_label.npy").unlink()
    refused(db_copy, "query_label.npy", "missing")
    (db_copy / "meta.json").unlink()
    refused(db_copy, "meta.json")


def test_arrays_of_unequal_length_are_refused(db_copy):
    np.save(db_copy / "db_label.npy", np.load(db_copy / "db_label.npy")[:-1])
    refused(db_copy, "disagree in length")


def test_names_of_unequal_length_are_refused(db_copy):
    names = (db_copy / "query_names.txt").read_text().splitlines()
    (db_copy / "query_names.txt").write_text("\n".join(names[:-1]) + "\n")
    refused(db_copy, "query files disagree in length")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled-object", "wrong-dtype"])
def test_a_corrupt_npy_is_named(db_copy, damage):
    path = db_copy / ("db_feature.npy" if damage == "truncated" else "db_binary.npy")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "pickled-object":
        np.save(path, np.array([CreatesMarker(db_copy / "PWNED")], dtype=object), allow_pickle=True)
    else:
        np.save(path, np.load(path).astype(np.int32))
    refused(db_copy, path.name)
    assert not (db_copy / "PWNED").exists()


def test_meta_bits_different_from_the_flag_are_refused(db_copy):
    refused(db_copy, "16-bit", "--bits 8", bits=8)
    meta = json.loads((db_copy / "meta.json").read_text())
    (db_copy / "meta.json").write_text(json.dumps({**meta, "bits": 8}))  # the codes still hold 16 bits
    refused(db_copy, "db_binary.npy", "not 8 bits", bits=8)
    (db_copy / "meta.json").write_text("{not json")
    refused(db_copy, "meta.json", "corrupt")


def test_a_changed_or_other_model_is_refused_for_queries_by_image(db_copy, built):
    """model_for_database: what query.py --image and demo.py --image rely on."""
    meta = database.read_meta(db_copy)
    model = Path(meta["model"])
    if not model.is_absolute():
        model = built / model
        meta["model"] = str(model)
    assert database.model_for_database(db_copy, meta) == model
    other = db_copy.parent / "other.pt"
    shutil.copy(model, other)
    with pytest.raises(UserError, match=r"is not the model that built .*python database.py --bits 16 --model"):
        database.model_for_database(db_copy, meta, model=other)
    with pytest.raises(UserError, match=r"sha256 differs.*python database.py --bits 16"):
        database.model_for_database(db_copy, {**meta, "model": str(other), "model_sha256": "0" * 64})


# ---------------------------------------------------------------------------------------------------------------
# Faults: interrupted and killed runs


def start(script, root, *args):
    """Popen of a repo script with the tests' environment; stdout is read line by line."""
    env = {**os.environ, "PYTHONWARNINGS": "default", **QUIET}
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_ctrl_c_during_training_ends_with_a_short_message_and_130(tmp_path):
    small_dataset(tmp_path)
    process = start("mytrain.py", tmp_path, *TRAIN, "--epochs", 50)
    # the decoded test images appear just before the first epoch: training is under way
    wait_for(lambda: list((tmp_path / "data/image/.cache").glob("testlist_*.npy")), process)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == ["interrupted"]
    assert not list(tmp_path.glob("model/*.pt"))


FAULTS = '''
import errno, os, signal
fault = os.environ.get("ROBUSTNESS_FAULT", "")
if fault:
    import numpy
    real_save, real_replace, saves = numpy.save, os.replace, []

    def save(file, *args, **kwargs):
        if ".tmp" in str(file):
            saves.append(file)
            if len(saves) == 3 and fault == "kill-mid-write":
                os.kill(os.getpid(), signal.SIGKILL)
            if len(saves) == 3 and fault == "disk-full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_save(file, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if os.path.isdir(src) and fault == "kill-before-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.path.isdir(src) and str(src).endswith(".tmp") and fault == "kill-mid-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.path.isdir(src) and str(src).endswith(".tmp") and fault == "swap-fails":
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(src))
        return real_replace(src, dst, *args, **kwargs)

    numpy.save, os.replace = save, replace
'''


def fault_env(tmp_path, fault):
    """Run a script with a fault injected at one exact point of database.write_database (via sitecustomize)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(FAULTS)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]), "ROBUSTNESS_FAULT": fault}


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("fault", ["kill-mid-write", "kill-before-swap", "disk-full", "swap-fails"])
def test_a_killed_or_failed_database_run_leaves_the_previous_database_intact(built_copy, fault):
    before = snapshot(built_copy / "database")
    lines = (built_copy / "data/query/list.txt").read_text().splitlines()
    (built_copy / "data/query/list.txt").write_text("\n".join(lines[:-1]) + "\n")  # the new one would differ

    result = encode(built_copy, env=fault_env(built_copy, fault))
    if fault.startswith("kill"):
        assert result.returncode == -signal.SIGKILL
    else:
        fails(result, "database", "Operation not permitted" if fault == "swap-fails" else "no space left on device")
    assert snapshot(built_copy / "database") == before
    db, query, meta = database.load_database(built_copy / "database", BITS, features=True)
    assert len(query.codes) == 4 and meta["num_queries"] == 4
    leftovers = [p.name for p in built_copy.iterdir() if p.name.startswith(".database.")]
    if fault in ("disk-full", "swap-fails"):  # a run that ends by itself tidies its temporary folder away
        assert not leftovers, leftovers
    if fault == "kill-mid-write":  # the half-written temporary folder does not stop the next run replacing it
        succeeds(encode(built_copy))
        assert len(database.load_database(built_copy / "database", BITS)[1].codes) == 3


def test_a_kill_between_the_two_renames_names_where_the_previous_database_is(built_copy):
    """The one instant the database folder is absent: the reader says where the previous one was put."""
    before = snapshot(built_copy / "database")
    result = encode(built_copy, env=fault_env(built_copy, "kill-mid-swap"))
    assert result.returncode == -signal.SIGKILL
    message = refused(built_copy / "database", "interrupted run left the previous one in", "mv it back")
    aside = Path(message.split("left the previous one in ")[1].split(":")[0])
    os.replace(aside, built_copy / "database")
    assert snapshot(built_copy / "database") == before


AUDIT = '''
import os, sys
log = os.environ.get("ROBUSTNESS_AUDIT")
if log:
    root = os.path.realpath(os.getcwd())
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(root + os.sep):
                with open(log, "a", encoding="utf-8") as out:  # an append, by the hook itself: outside root
                    out.write(f"{mode or 'os.open'}\\t{os.path.relpath(path, root)}\\n")

    sys.addaudithook(hook)
'''


def audit_env(tmp_path):
    """Run scripts so that every file they open for writing under tmp_path is logged to tmp_path/../writes.log."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(AUDIT)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
            "ROBUSTNESS_AUDIT": str(tmp_path.parent / f"{tmp_path.name}.writes.log")}


def assert_writes_were_atomic(tmp_path):
    """Every write under tmp_path went to a temporary name (a '.<name>.*.tmp' file or folder) renamed later,
    except the JSON-lines log that mytrain.py appends to."""
    log = tmp_path.parent / f"{tmp_path.name}.writes.log"
    writes = [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines()]
    assert writes, "the audit hook saw nothing"
    for mode, path in writes:
        parts = Path(path).parts
        if any(part.startswith(".") and part.endswith(".tmp") for part in parts):
            continue
        assert mode == "a" and path.endswith(".jsonl"), f"{path} was written in place (mode {mode})"


# ---------------------------------------------------------------------------------------------------------------
# The later stages (mAP.py, search.py, query.py, demo.py) on a real database: refusals and atomic writes


def stage(root, script, *args, env=None):
    return run(REPO / script, "--bits", BITS, "--device", "cpu", *args, cwd=root, check=False,
               env={**QUIET, **(env or {})})


@pytest.fixture
def built_copy(tmp_path, built):
    """A copy of the built root (data, model, database) that a test may damage."""
    for folder in ("data", "model", "database"):
        shutil.copytree(built / folder, tmp_path / folder)
    return tmp_path


@pytest.mark.parametrize("script, damage", [("mAP.py", "unequal-length"), ("search.py", "truncated-feature"),
                                            ("query.py", "meta-bits"), ("demo.py", "missing")])
def test_every_stage_refuses_a_damaged_database(built_copy, script, damage):
    """Each stage through the one reader: every damage is checked in the reader's tests above, one per stage here."""
    folder = built_copy / "database"
    if damage == "unequal-length":
        np.save(folder / "query_label.npy", np.load(folder / "query_label.npy")[:-1])
        names = ("query files disagree in length",)
    elif damage == "truncated-feature":
        data = (folder / "db_feature.npy").read_bytes()
        (folder / "db_feature.npy").write_bytes(data[:len(data) // 3])
        names = ("db_feature.npy", "corrupt")
    elif damage == "meta-bits":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "bits": 8}))
        names = ("8-bit", "--bits 16")
    else:
        shutil.rmtree(folder)
        names = ("database", "does not exist")
    fails(stage(built_copy, script), *names, "python database.py --bits")


def test_a_query_by_image_refuses_a_changed_or_other_model(built_copy):
    """Each stage that encodes new images through database.model_for_database (its cases are tested above)."""
    image = built_copy / "data/query/query/c0_0.png"
    succeeds(stage(built_copy, "query.py", "--image", image))  # as built: accepted
    other = built_copy / "other.pt"
    shutil.copy(next((built_copy / "model").glob("16bits_*.pt")), other)
    line = fails(stage(built_copy, "demo.py", "--image", image, "--model", other), "other.pt",
                 "python database.py --bits 16 --model")
    assert "not the model that built" in line
    path = next((built_copy / "model").glob("16bits_*.pt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "test_accuracy": checkpoint["test_accuracy"] / 2}, path)  # valid, another sha256
    fails(stage(built_copy, "query.py", "--image", image), "sha256", "python database.py --bits 16")


def test_the_later_stages_write_only_through_temporary_names(built_copy):
    audit = audit_env(built_copy)
    for script, *args in (("mAP.py",), ("mAP.py", "--rerank"), ("search.py",), ("query.py",), ("demo.py", "--num", 1),
                          ("query.py", "--image", built_copy / "data/query/query")):
        succeeds(stage(built_copy, script, *map(str, args), env=audit))
    produced = sorted(p.name for p in (built_copy / "result").iterdir())
    assert {"map_16bits.json", "query.txt", "query_images.txt", "demo_1.png"} <= set(produced), produced
    assert_writes_were_atomic(built_copy)
