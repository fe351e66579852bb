"""Bad input, round two: flag ranges, failed writes, untrusted database files and folders, readers during a swap.

Each class of input is provoked for real: the scripts' own parsers and command lines, files crafted on disk, a
writer process swapping databases while this one reads, a file size limit (RLIMIT_FSIZE) or a tiny tmpfs for a
full disk. Most checks need no model (tests/fake_database.py); the few that do share one tiny model per module.
"""
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, class_image, make_dataset, run
from fake_database import write_fake_database

sys.path.insert(0, str(REPO))

import database  # noqa: E402  (after the path is set)
import MyDataset  # noqa: E402
import stage  # noqa: E402
from stage import UserError  # noqa: E402

QUIET = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "default"}
TRAIN = ("--bits", 8, "--pretrained", "none", "--img-size", 64, "--epochs", 1, "--batch-size", 8, "--device", "cpu",
         "--workers", 0, "--seed", 0)
UMASK = 0o002  # not the usual 022: a file created 0600 or 0644 regardless of it would show


def script_run(script, *args, cwd, fsize=None, umask=UMASK):
    """python SCRIPT ARGS in cwd, as a user whose umask is UMASK, optionally with a file size limit (bytes: a write
    past it fails with EFBIG, like a full disk)."""
    return run(REPO / script, *args, cwd=cwd, check=False, env=QUIET, umask=umask, fsize=fsize)


def fails(result, *names):
    """Exit status 2, one line on stderr naming each of names, no traceback; returns that line."""
    # progress bars of the main rank are not the scripts' words (explicit disable= there overrides TQDM_DISABLE)
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith("warning: ") and "%|" not in line]
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert str(name).lower() in lines[0].lower(), f"{name!r} not named in: {lines[0]}"
    return lines[0]


def succeeds(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def strict_json(path):
    """Parse as strict JSON: NaN and Infinity are not JSON, whatever Python's json module accepts by default."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A root with 2 small classes, one 8-bit model trained for an epoch and its database, made with umask 002."""
    root = tmp_path_factory.mktemp("built")
    make_dataset(root / "data", classes=2, train_per_class=8, test_per_class=2, query_per_class=2)
    succeeds(script_run("mytrain.py", *TRAIN, cwd=root))
    succeeds(script_run("database.py", "--bits", 8, "--device", "cpu", "--workers", 0, cwd=root))
    return root


@pytest.fixture
def built_copy(tmp_path, built):
    for folder in ("data", "model", "database"):
        shutil.copytree(built / folder, tmp_path / folder, symlinks=True)
    return tmp_path


@pytest.fixture
def fake(tmp_path):
    """A run folder holding a generated 16-bit database/ (no model needed)."""
    write_fake_database(tmp_path / "database", bits=16, num_db=60, num_query=6, num_classes=3)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# 1. Flags: every numeric flag range-checked by the script's own parser, before any work


def parser_of(script):
    return __import__(script).get_args_parser()


BAD_FLAGS = [
    ("mytrain", "--batch-size", "0"), ("mytrain", "--batch-size", "-1"), ("mytrain", "--workers", "-1"),
    ("mytrain", "--seed", "-1"), ("mytrain", "--seed", str(2**32)), ("mytrain", "--dropout", "1.5"),
    ("mytrain", "--dropout", "nan"), ("mytrain", "--label-smoothing", "-0.1"), ("mytrain", "--lr", "0"),
    ("mytrain", "--lr", "inf"), ("mytrain", "--lr", "nan"), ("mytrain", "--warmup", "-1"),
    ("mytrain", "--warmup", "inf"), ("mytrain", "--weight-decay", "-1e-4"), ("mytrain", "--weight-decay", "nan"),
    ("mytrain", "--epochs", "0"), ("mytrain", "--img-size", "32"), ("mytrain", "--new-lr-scale", "-inf"),
    ("database", "--batch-size", "-1"), ("database", "--batch-size", "0"), ("database", "--workers", "-2"),
    ("database", "--bits", "0"),
    ("mAP", "--topk", "0"), ("mAP", "--threads", "0"), ("mAP", "--memory-mb", "-5"), ("mAP", "--memory-mb", "0"),
    ("search", "--tolerance", "nan"), ("search", "--tolerance", "-0.1"), ("search", "--tolerance", "inf"),
    ("search", "--queries", "-1"), ("search", "--time-queries", "-1"), ("search", "--max-radius", "-1"),
    ("search", "--threads", "-1"), ("search", "--memory-mb", str(10**12)),
    ("query", "--radius", "-1"), ("query", "--topk", "0"), ("query", "--threads", "0"), ("query", "--batch-size", "0"),
    ("query", "--memory-mb", "0"), ("demo", "--num", "-1"), ("demo", "--topk", "-3"),
    ("prepare_data", "--test-fraction", "nan"), ("prepare_data", "--seed", "-1"), ("prepare_data", "--workers", "0"),
    ("prepare_data", "--limit-per-class", "0"),
]
REQUIRED = {"mytrain": [], "database": ["--bits", "8"], "mAP": ["--bits", "8"], "search": ["--bits", "8"],
            "query": ["--bits", "8"], "demo": ["--bits", "8"], "prepare_data": ["folder", "x"]}


@pytest.mark.parametrize("script, flag, value", BAD_FLAGS)
def test_every_numeric_flag_is_range_checked_by_its_parser(script, flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        parser_of(script).parse_args([*REQUIRED[script], f"{flag}={value}"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {flag}:" in error and value in error, error


@pytest.mark.parametrize("script, flag, value", [("search", "--queries", "0"), ("search", "--tolerance", "0"),
                                                 ("mytrain", "--dropout", "1"), ("query", "--radius", "0"),
                                                 ("mytrain", "--lr", "1e-5"), ("demo", "--num", "0")])
def test_values_at_the_edge_of_a_range_are_accepted(script, flag, value):
    parser_of(script).parse_args([*REQUIRED[script], flag, value])


def test_a_negative_batch_size_never_replaces_a_good_database(built_copy):
    before = snapshot(built_copy / "database")
    result = script_run("database.py", "--bits", 8, "--batch-size", -1, "--device", "cpu", cwd=built_copy)
    assert result.returncode == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(built_copy / "database") == before


@pytest.mark.parametrize("script, flag, value", [("mAP.py", "--memory-mb", "-5"), ("search.py", "--tolerance", "nan"),
                                                 ("query.py", "--topk", "0")])
def test_a_bad_flag_on_the_command_line_is_exit_2_before_any_output(fake, script, flag, value):
    result = script_run(script, "--bits", 16, flag, value, cwd=fake)
    assert result.returncode == 2 and f"argument {flag}" in result.stderr and "Traceback" not in result.stderr
    assert not (fake / "result").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Disk full and failed writes


def test_os_error_lines_name_the_file_and_a_full_disk():
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:
            f.write("x" * 10000)
    assert stage.os_error_line("/dev/full", full.value) == "/dev/full: no space left on device"
    short = OSError("1000000 requested and 99872 written")  # numpy's short write: no errno
    assert "requested and" in stage.os_error_line("/data/x.npy", short)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert stage.is_write_failure(torch_error) and not stage.is_write_failure(RuntimeError("a bug"))


def test_a_write_past_the_file_size_limit_keeps_the_previous_database(built_copy):
    """numpy's short write (an OSError without errno) while database.py writes its features."""
    before = snapshot(built_copy / "database")
    (built_copy / "data/query/list.txt").write_text("".join(
        (built_copy / "data/query/list.txt").read_text().splitlines(keepends=True)[:-1]))  # the new one differs
    result = script_run("database.py", "--bits", 8, "--device", "cpu", "--workers", 0, cwd=built_copy,
                        fsize=64 * 1024)  # db_feature.npy is 16 x 4096 fp16 = 128 KiB
    fails(result, "database/db_feature.npy", "previous file")
    assert snapshot(built_copy / "database") == before
    assert not [p for p in built_copy.iterdir() if p.name.startswith(".database.")]


def test_a_failed_result_write_is_named(fake):
    result = script_run("mAP.py", "--bits", 16, "--device", "cpu", cwd=fake, fsize=1024)
    fails(result, "map_16bits.json", "File too large")
    assert not list((fake / "result").glob(".*.tmp"))


def test_a_failed_resume_write_is_named_and_leaves_no_partial_file(built_copy):
    """torch.save's RuntimeError (no errno) when the .resume state cannot be written."""
    shutil.rmtree(built_copy / "model")
    result = script_run("mytrain.py", *TRAIN, cwd=built_copy, fsize=4 << 20)  # the decoded cache fits, the state not
    line = fails(result, ".resume", "could not write")
    assert "nothing previous" not in line
    assert not [p.name for p in (built_copy / "model").iterdir() if p.suffix in (".resume", ".tmp", ".pt")]


def mount_tmpfs(mount, size):
    """Mount a tmpfs of size bytes on mount; False where that is not allowed (not root, a container without it)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    return done.returncode == 0


def test_a_training_run_whose_resume_write_hit_a_full_disk_resumes_from_the_previous_epoch(built_copy):
    """A disk with room for one training state and not two: epoch 1's state is written, epoch 2's cannot be
    written beside it. The run stops naming the full disk, and epoch 1's state, intact, finishes the run."""
    model = next((built_copy / "model").glob("8bits_*.pt")).stat().st_size
    state = 3 * model  # the weights and AdamW's two moments
    disk = built_copy / "disk"
    if not mount_tmpfs(disk, state * 3 // 2):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = script_run("mytrain.py", *TRAIN, "--epochs", 2, "--model-dir", disk, cwd=built_copy)
        fails(result, ".resume", "no space left on device")
        states = list(disk.glob("8bits_*.resume"))
        assert len(states) == 1 and not list(disk.glob(".*.tmp")), list(disk.iterdir())
        shutil.copytree(disk, built_copy / "elsewhere")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    resumed = succeeds(script_run("mytrain.py", "--bits", 8, "--resume", "--model-dir", built_copy / "elsewhere",
                                  "--device", "cpu", "--workers", 0, cwd=built_copy))
    assert "from epoch 2 of 2 (1 completed)" in resumed.stdout
    finished = json.loads(resumed.stdout.strip().splitlines()[-1])  # the run keeps its --model-dir: read where
    assert (built_copy / finished["model"]).is_file()


# ---------------------------------------------------------------------------------------------------------------
# 3. Database files are untrusted input


def refused(folder, *names, bits=16, features=True):
    with pytest.raises(UserError) as caught:
        database.load_database(folder, bits, features=features)
    message = str(caught.value)
    assert "\n" not in message and f"python database.py --bits {bits}" in message, message
    for name in names:
        assert str(name) in message, message
    return message


def set_meta(folder, **fields):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **fields}))


@pytest.mark.parametrize("field, value", [("bits", "16"), ("bits", -16), ("bits", True), ("bits", 16.5),
                                          ("labels", "class0"), ("labels", [0, 1, 2]), ("labels", None),
                                          ("model", 5), ("model", ["a"]), ("num_database", "60")])
def test_meta_json_with_wrong_types_is_refused(fake, field, value):
    set_meta(fake / "database", **{field: value})
    refused(fake / "database", "meta.json", field)


@pytest.mark.parametrize("text", ['{"bits": NaN}', '{"bits": 16, "labels": [], "x": Infinity}',
                                  '{"bits": 16, "y": -Infinity}', "[1, 2]", "\xff\xfe not utf-8",
                                  pytest.param("[" * 100000 + "]" * 100000, id="nested-100000-deep")])
def test_meta_json_that_is_not_strict_json_or_not_an_object_is_refused(fake, text):
    path = fake / "database/meta.json"
    path.write_bytes(text.encode("latin-1"))
    refused(fake / "database", "meta.json", "corrupt")


def test_names_that_are_not_utf8_or_of_another_count_are_refused(fake):
    folder = fake / "database"
    good = (folder / "db_names.txt").read_bytes()
    (folder / "db_names.txt").write_bytes(good.replace(b"db/00003.png", b"db/\xff\xfe0003.png"))
    refused(folder, "db_names.txt", "not UTF-8")
    (folder / "db_names.txt").write_bytes(good + b"extra.png\n")
    refused(folder, "db files disagree in length")
    (folder / "db_names.txt").write_bytes(good[:-1])
    refused(folder, "db_names.txt", "cut off")


@pytest.mark.parametrize("damage", ["width", "dtype", "nan", "inf", "huge-shape", "fortran"])
def test_features_of_the_wrong_width_dtype_or_not_finite_are_refused(fake, damage):
    folder = fake / "database"
    features = np.load(folder / "query_feature.npy")
    if damage == "width":
        np.save(folder / "query_feature.npy", features[:, :-1])
    elif damage == "dtype":
        np.save(folder / "query_feature.npy", features.astype(np.float32))
    elif damage in ("nan", "inf"):
        features[3, 5] = np.nan if damage == "nan" else -np.inf
        np.save(folder / "query_feature.npy", features)
    elif damage == "huge-shape":  # a header claiming 10^12 rows must be refused before anything is allocated
        header = (folder / "query_feature.npy").read_bytes()
        (folder / "query_feature.npy").write_bytes(header.replace(b"(6, 32)", b"(1000000000000, 32)", 1))
    else:
        np.save(folder / "query_feature.npy", np.asfortranarray(features))
    refused(folder, "query_feature.npy")
    database.load_database(folder, 16, features=False)  # the features are read only when asked for


def test_labels_outside_the_label_list_are_refused(fake):
    labels = np.load(fake / "database/db_label.npy")
    labels[0] = 7
    np.save(fake / "database/db_label.npy", labels)
    refused(fake / "database", "db_label.npy", "outside")


@pytest.mark.parametrize("script", ["mAP.py", "search.py", "query.py", "demo.py"])
def test_every_stage_names_a_crafted_database_file_and_the_rebuild_command(fake, script):
    set_meta(fake / "database", bits="16")
    fails(script_run(script, "--bits", 16, "--device", "cpu", cwd=fake), "meta.json", "python database.py --bits 16")


def test_a_model_giving_non_finite_features_is_named(built_copy):
    import torch

    path = next((built_copy / "model").glob("8bits_*.pt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    weights = checkpoint["model"] if "model" in checkpoint else checkpoint["state_dict"]
    fc7 = next(k for k, v in weights.items() if k.endswith(".weight") and tuple(v.shape) == (4096, 4096))
    weights[fc7[:-len("weight")] + "bias"].fill_(1e6)  # fc7 = ReLU(... + 1e6): far beyond fp16's 65504
    blown = built_copy / "model/blown.pt"
    torch.save(checkpoint, blown)
    before = snapshot(built_copy / "database")
    result = script_run("database.py", "--bits", 8, "--model", blown, "--device", "cpu", "--workers", 0,
                        cwd=built_copy)
    fails(result, "blown.pt", "NaN or infinite")
    assert snapshot(built_copy / "database") == before


# ---------------------------------------------------------------------------------------------------------------
# Every JSON file the project writes is valid JSON


def test_search_without_timing_writes_valid_json(fake):
    succeeds(script_run("search.py", "--bits", 16, "--time-queries", 0, "--max-radius", 3, "--device", "cpu", cwd=fake))
    result = strict_json(fake / "result/search_16bits.json")
    assert all(row["ms/query"] is None for row in result["rows"])


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    stage.write_json(tmp_path / "x.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# ---------------------------------------------------------------------------------------------------------------
# 5. prepare_data.py folder takes an untrusted folder


@pytest.fixture
def hostile_folder(tmp_path):
    """PATH/<class>/ with 3 good images per class and, among them, every kind of file that must not be copied."""
    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (source / name).mkdir(parents=True)
        for i in range(3):
            class_image(label, rng).save(source / name / f"{i}.png")
    cat = source / "cat"
    os.mkfifo(cat / "fifo.png")  # reading it would block forever
    (cat / "zero.png").symlink_to("/dev/zero")  # outside, and a device: reading never ends
    (cat / "secret.png").symlink_to(tmp_path / "secret.txt")  # a link out of the folder to a private file
    (tmp_path / "secret.txt").write_text("not for data/\n")
    (cat / "loop_a.png").symlink_to(cat / "loop_b.png")
    (cat / "loop_b.png").symlink_to(cat / "loop_a.png")
    (cat / "up").symlink_to(source)  # a folder loop
    (cat / "text.png").write_text("a text file, not an image\n")
    (cat / "inside.png").symlink_to(source / "dog" / "0.png")  # a link that stays inside: followed
    outside_image = tmp_path / "outside.png"
    class_image(1, rng).save(outside_image)
    (source / "dog" / "away.png").symlink_to(outside_image)
    return source


def test_an_untrusted_folder_yields_only_its_regular_image_files(tmp_path, hostile_folder):
    result = succeeds(run(REPO / "prepare_data.py", "folder", hostile_folder, "--data-root", tmp_path / "data",
                          "--workers", 1, cwd=tmp_path, check=False, env=QUIET))
    note = next(line for line in result.stdout.splitlines() if line.startswith("note: skipped"))
    assert "7 file(s)" in note and "1 not regular files" in note and "2 broken or looping symlinks" in note
    assert "1 files whose header is not an image" in note and "3 symlinks leading outside" in note
    listed = [line.split()[0] for name in ("trainlist.txt", "testlist.txt")
              for line in (tmp_path / "data/image" / name).read_text().splitlines()]
    stems = sorted(Path(name).name for name in listed)
    assert stems == ["0.png", "0.png", "1.png", "1.png", "2.png", "2.png", "inside.png"], stems
    copied = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert not any(b"not for data" in p.read_bytes() for p in copied)
    recorded = strict_json(tmp_path / "data/prepare_data.json")["skipped"]
    assert sum(recorded.values()) == 7

    followed = succeeds(run(REPO / "prepare_data.py", "folder", hostile_folder, "--data-root", tmp_path / "data2",
                            "--workers", 1, "--follow-symlinks", cwd=tmp_path, check=False, env=QUIET))
    assert "2 files whose header is not an image" in followed.stdout  # the secret text file: followed, not an image
    listed = (tmp_path / "data2/image/trainlist.txt").read_text() + (tmp_path / "data2/image/testlist.txt").read_text()
    assert "away.png" in listed and "zero.png" not in listed and "secret.png" not in listed


# ---------------------------------------------------------------------------------------------------------------
# 6 and 8. List entries outside the data root; control characters in paths


def test_list_entries_outside_the_folder_are_warned_once_and_read(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", classes=2, train_per_class=3, test_per_class=1, query_per_class=1)
    trainlist = data / "image/trainlist.txt"
    lines = trainlist.read_text().splitlines()
    outside = tmp_path / "elsewhere.png"
    shutil.copy(data / "image" / lines[0].split()[0], outside)
    trainlist.write_text("\n".join(lines + [f"{outside} 0", "../query/list.txt 1"]) + "\n")
    entries = MyDataset.read_list(trainlist, need_label=True)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "2 path(s) outside" in warnings[0] and str(outside) in warnings[0]
    assert len(entries) == len(lines) + 2
    assert MyDataset.image_header(trainlist.parent / entries[-2].path) == (32, 32)  # absolute: read where it is
    with pytest.raises(UserError, match="outside.*2 such entries.*--strict-paths"):
        MyDataset.read_list(trainlist, need_label=True, strict_paths=True)


def test_strict_paths_refuses_outside_entries_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", classes=2, train_per_class=3, test_per_class=1, query_per_class=1)
    with open(data / "image/testlist.txt", "a") as f:
        f.write("../../x.png 0\n")
    fails(script_run("mytrain.py", *TRAIN, "--strict-paths", cwd=tmp_path), "testlist.txt:3", "../../x.png")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("character", ["\x1b", "\x07", "\x7f", "\u2028", "\x85"])
def test_control_characters_in_list_paths_are_refused(tmp_path, character):
    listed = tmp_path / "list.txt"
    listed.write_text(f"a.png 0\nb{character}c.png 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"list.txt:2: holds the control character"):
        MyDataset.read_list(listed, need_label=True)


def test_the_control_character_classes_are_unicodes_over_every_code_point(tmp_path):
    """MyDataset's two regular expressions against unicodedata's categories Cc, Zl, Zp, for all 1,114,112 code
    points; in list lines a tab separates fields and is no control character."""
    for point in range(sys.maxunicode + 1):
        character = chr(point)
        control = unicodedata.category(character) in ("Cc", "Zl", "Zp")
        assert (MyDataset.control_character(character) is not None) == control, hex(point)
        assert (MyDataset.control_character(character, MyDataset.CONTROL_BUT_TAB) is not None) == (
            control and character != "\t"), hex(point)
    listed = tmp_path / "list.txt"
    listed.write_text("a.png\t0\nb.png \t 1\n", encoding="utf-8")
    assert [e.label for e in MyDataset.read_list(listed, need_label=True)] == ["0", "1"]


def test_query_image_refuses_names_with_a_newline_and_special_files(fake):
    weird = fake / "two\nlines.png"
    class_image(0, np.random.default_rng(0)).save(weird)
    fails(script_run("query.py", "--bits", 16, "--device", "cpu", "--image", weird, cwd=fake), "control character")
    os.mkfifo(fake / "fifo.png")
    for special in (fake / "fifo.png", "/dev/zero"):
        fails(script_run("query.py", "--bits", 16, "--device", "cpu", "--image", special, cwd=fake),
              "not a regular file")
    assert not (fake / "result").exists()


def test_image_files_names_fifos_and_devices_as_not_regular(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    for special in (tmp_path / "x.png", "/dev/zero", "/dev/null"):
        with pytest.raises(UserError, match="not a regular file"):
            MyDataset.image_files([special])
    with pytest.raises(UserError, match="no such file or folder"):
        MyDataset.image_files([tmp_path / "absent.png"])


# ---------------------------------------------------------------------------------------------------------------
# 7. Readers during a database swap


WRITER = textwrap.dedent('''
    import sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import database
    folder, stop = Path(sys.argv[2]), Path(sys.argv[3])
    generation = 0
    while not stop.exists():
        generation += 1
        g, rows = generation % 2000 + 1, 2000 + generation % 7  # every generation differs in content and length
        parts = {part: (np.full((rows, 2), g % 256, np.uint8), np.full(rows, g % 3, np.int64),
                        np.full((rows, 64), g, np.float16), [f"g{g}/{i}" for i in range(rows)])
                 for part in ("db", "query")}
        database.write_database(folder, parts, {"format": 1, "bits": 16, "g": g, "labels": ["a", "b", "c"],
                                                "num_database": rows, "num_queries": rows, "feature_dim": 64})
    print(generation)
''')


def whole_generation(db, query, meta):
    g = meta["g"]
    return all((split.codes == g % 256).all() and (split.labels == g % 3).all() and (split.features == g).all()
               and all(name.startswith(f"g{g}/") for name in split.names) for split in (db, query))


def test_a_swap_ending_between_a_failed_open_and_the_look_aside_is_no_missing_folder(tmp_path, monkeypatch):
    # The one interleaving the stress test above meets only now and then, made certain: the reader's open finds the
    # name empty mid-swap, and by the time it looks for the previous folder aside, the swap is over and gone.
    folder = tmp_path / "database"
    rows = 3
    part = (np.zeros((rows, 2), np.uint8), np.zeros(rows, np.int64), np.zeros((rows, 4), np.float16), ["a", "b", "c"])
    database.write_database(folder, {"db": part, "query": part}, {"format": 1, "bits": 16, "labels": ["a"],
                                                                 "num_database": rows, "num_queries": rows,
                                                                 "feature_dim": 4})
    real_open, failed = os.open, []

    def open_mid_swap(path, flags, *args, **kwargs):
        if Path(path) == folder and not failed:
            failed.append(path)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(database.os, "open", open_mid_swap)
    db, query, meta = database.load_database(folder, 16, features=True)
    assert failed and db.names == ["a", "b", "c"] and meta["bits"] == 16
    shutil.rmtree(folder)
    with pytest.raises(UserError, match="does not exist"):  # a folder really gone is still called missing
        database.load_database(folder, 16)


def test_readers_during_swaps_read_one_whole_generation_or_stop(tmp_path):
    folder, stop = tmp_path / "database", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(folder), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    outcomes = {"whole": 0, "changed": 0, "mixed": 0, "other": []}
    try:
        while not (folder / "meta.json").exists():
            assert writer.poll() is None, "the writer died"
        for _ in range(200):
            try:
                db, query, meta = database.load_database(folder, 16, features=True)
            except UserError as err:
                if str(err) == database.CHANGED:
                    outcomes["changed"] += 1
                else:
                    outcomes["other"].append(str(err))
                continue
            outcomes["whole" if whole_generation(db, query, meta) else "mixed"] += 1
    finally:
        stop.touch()
        swaps = int(writer.communicate(timeout=120)[0])
    print(f"200 reads during {swaps} swaps: {outcomes['whole']} whole, {outcomes['changed']} stopped as changed")
    assert outcomes["mixed"] == 0 and outcomes["other"] == [], outcomes
    assert outcomes["whole"] > 0 and swaps > 10
    db, query, meta = database.load_database(folder, 16, features=True)  # at rest: whole, and nothing left over
    assert whole_generation(db, query, meta)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".database.")] == []


# ---------------------------------------------------------------------------------------------------------------
# 9. File modes: what the stages create follows the user's umask


def test_models_databases_and_results_follow_the_umask(built, fake):
    file_mode, folder_mode = 0o666 & ~UMASK, 0o777 & ~UMASK
    succeeds(script_run("mAP.py", "--bits", 16, "--device", "cpu", cwd=fake))
    created = [*(built / "model").iterdir(), *(built / "database").iterdir(), *(fake / "result").iterdir()]
    assert len(created) > 10
    for path in created:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, (path, oct(path.stat().st_mode))
    for folder in (built / "database", built / "model", fake / "result"):
        assert stat.S_IMODE(folder.stat().st_mode) == folder_mode, (folder, oct(folder.stat().st_mode))
