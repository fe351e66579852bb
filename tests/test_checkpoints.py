"""Checkpoints: one shape for models and resume states, older model files, untrusted fields, --resume and its flags.

Every refusal is one line on stderr and exit status 2, before any image is decoded.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TRAIN_FLAGS, make_dataset, run

sys.path.insert(0, str(REPO))

import MyDataset  # noqa: E402
import net  # noqa: E402
from stage import UserError  # noqa: E402

QUIET = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "default"}
FORMAT1 = json.loads((REPO / "tests/data/checkpoint_format1.json").read_text())


def one_line_error(result, *names):
    """Exit status 2 and one line on stderr naming each of names; returns that line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def encode(root, *args):
    return run(REPO / "database.py", "--bits", 8, "--device", "cpu", "--workers", 0, *args, cwd=root, check=False,
               env=QUIET)


def write_format1(path, model):
    """A model file exactly as mytrain.py wrote it before model_args (format 1), holding model's tensors.

    tests/data/checkpoint_format1.json records such a file written by that mytrain.py: its every field, and its
    state_dict's keys, shapes and dtypes in order. The file here has those fields in that order, and model's
    tensors (same shapes, same order) under those keys, saved by torch.save as net.save_checkpoint did then.
    """
    tensors = list(model.state_dict().values())
    assert [(list(t.shape), str(t.dtype)) for t in tensors] == \
        [(shape, f"torch.{dtype}") for _, shape, dtype in FORMAT1["state_dict"]]
    fields = dict(FORMAT1["fields"])
    state = {key: tensor for (key, _, _), tensor in zip(FORMAT1["state_dict"], tensors)}
    torch.save({"format": fields.pop("format"), "state_dict": state, **fields}, path)


def test_a_model_file_of_format_1_still_loads_and_encodes_the_same(tmp_path):
    """Old layer names (remain, Linear1, Linear2) and top-level fields: database.py uses it as it is."""
    fields = FORMAT1["fields"]
    torch.manual_seed(0)
    model = net.AlexNetPlusLatent(fields["bits"], len(fields["classes"]), fields["recipe"], fields["dropout"]).eval()
    make_dataset(tmp_path / "data", classes=3, train_per_class=4, test_per_class=1, query_per_class=2)
    write_format1(tmp_path / "old.pt", model)
    assert encode(tmp_path, "--model", "old.pt").returncode == 0

    loaded, checkpoint = net.load_model(tmp_path / "old.pt")
    assert checkpoint["model_args"] == {key: fields[key] for key in net.model_args(8, [], 64, "", 0)}
    assert checkpoint["test_accuracy"] == fields["test_accuracy"] and checkpoint["args"] == fields["args"]
    names = (tmp_path / "database/query_names.txt").read_text().splitlines()
    images = np.stack([np.asarray(MyDataset.read_image(tmp_path / "data/query" / name)) for name in names])
    x = MyDataset.eval_transform(torch.from_numpy(images), 64, fields["mean"], fields["std"])
    with torch.no_grad():
        codes, _, _ = model(x)  # the reference: the network the old file was written from
    expected = np.packbits((codes > 0.5).numpy(), axis=1)
    assert np.array_equal(np.load(tmp_path / "database/query_binary.npy"), expected)


def test_torchvision_alexnet_weights_load_into_fc6_fc7(tmp_path):
    import torchvision

    alexnet = torchvision.models.alexnet()
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pt")
    model = net.AlexNetPlusLatent(8, 3, "bnconv")
    net.load_pretrained(model, str(tmp_path / "alexnet.pt"))
    assert torch.equal(model.fc6_fc7[1].weight, alexnet.classifier[1].weight)
    assert torch.equal(model.fc6_fc7[4].bias, alexnet.classifier[4].bias)
    assert torch.equal(model.features[model.conv_indices[4]].weight, alexnet.features[10].weight)


# ---------------------------------------------------------------------------------------------------------------
# Untrusted fields: each checked before the network is built or any image decoded


def small_checkpoint(**changes):
    """A format 2 checkpoint dict whose model_args are changed by changes; its model state is empty."""
    return {"format": 2, "model_args": {**net.model_args(8, ["a", "b"], 64, "bnconv", 0.0), **changes}, "model": {}}


@pytest.mark.parametrize("changes, words", [
    ({"bits": "48"}, "bits must be an integer"),
    ({"bits": 8.0}, "bits must be an integer"),
    ({"bits": True}, "bits must be an integer"),
    ({"bits": 10 ** 6}, "bits must be an integer"),
    ({"img_size": 32}, "img_size must be an integer from 64"),
    ({"img_size": "64"}, "img_size must be an integer from 64"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean must be 3 finite numbers"),
    ({"std": [0.2, float("inf"), 0.2]}, "std must be 3 finite numbers"),
    ({"std": [0.2, "0.2", 0.2]}, "std must be 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ({"classes": "ab"}, "classes must be a list"),
    ({"classes": ["a", 2]}, "classes must be a list"),
    ({"recipe": "other"}, "recipe must be one of"),
    ({"dropout": 2}, "dropout must be a number from 0 to 1"),
], ids=lambda value: str(value)[:30])
def test_each_model_args_field_is_checked(tmp_path, changes, words):
    torch.save(small_checkpoint(**changes), tmp_path / "crafted.pt")
    with pytest.raises(UserError, match="is not a checkpoint written by mytrain.py") as caught:
        net.load_model(tmp_path / "crafted.pt", bits=48)
    assert words in str(caught.value)


def test_bits_as_a_string_is_refused_by_the_real_command_line(tmp_path):
    """Once 'is a 48-bit model but --bits 48 was given'; now the field itself is named, before any image is read."""
    make_dataset(tmp_path / "data", classes=2, train_per_class=1, test_per_class=1, query_per_class=1)
    (tmp_path / "data/image/list.txt").write_text("missing.png 0\n")  # would stop the run if it got that far
    torch.save(small_checkpoint(bits="48"), tmp_path / "crafted.pt")
    line = one_line_error(encode(tmp_path, "--model", "crafted.pt"), "crafted.pt", "not a checkpoint written by",
                          "bits must be an integer")
    assert "missing.png" not in line


@pytest.mark.parametrize("damage", ["latent-bits", "classes", "missing-key", "dtype"])
def test_tensors_that_do_not_fit_model_args_are_refused(tmp_path, damage):
    """Checked against the shapes of a network that holds no memory (device meta), before one is built."""
    state = net.build_model(net.model_args(8, ["a", "b"], 64, "bn", 0.0), device="meta").state_dict()
    state = {key: torch.zeros(value.shape, dtype=value.dtype) if value.numel() < 10 ** 5 else
             torch.zeros(1) for key, value in state.items()}  # large tensors: caught by their shape alone
    args = net.model_args(8, ["a", "b"], 64, "bn", 0.0)
    if damage == "latent-bits":
        args["bits"] = 16
    elif damage == "classes":
        args["classes"] = ["a", "b", "c"]
    elif damage == "missing-key":
        state.pop("latent.bias")
    else:
        state["classifier.bias"] = state["classifier.bias"].double()
    torch.save({"format": 2, "model_args": args, "model": state}, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match="is not a checkpoint written by mytrain.py"):
        net.read_checkpoint(tmp_path / "crafted.pt")


PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_a_small_file_claiming_a_huge_network_is_refused_without_allocating_it(tmp_path):
    """bits 4096 and 100,000 classes would be a 1.6 GB classifier: refused on its shapes, with the memory of a
    process that imports torch, not of that network (a 4.7 MB file once took 1.8 GB)."""
    args = net.model_args(4096, [str(i) for i in range(100_000)], 64, "dlbhc", 0.5)
    torch.save({"format": 2, "model_args": args, "model": {"classifier.weight": torch.zeros(1)}}, tmp_path / "big.pt")
    assert (tmp_path / "big.pt").stat().st_size < 5 << 20
    make_dataset(tmp_path / "data", classes=2, train_per_class=1, test_per_class=1, query_per_class=1)
    command = [sys.executable, str(REPO / "database.py"), "--bits", "4096", "--model", "big.pt", "--device", "cpu"]
    peak_mb = int(subprocess.run([sys.executable, "-c", PEAK, *command], cwd=tmp_path, capture_output=True,
                                 text=True, check=True).stdout)
    baseline = [sys.executable, "-c", "import torch, torchvision, numpy, PIL"]
    torch_mb = int(subprocess.run([sys.executable, "-c", PEAK, *baseline], capture_output=True, text=True,
                                  check=True).stdout)
    one_line_error(encode(tmp_path, "--bits", 4096, "--model", "big.pt"), "big.pt", "not the network's")
    print(f"peak RSS: {peak_mb} MB refusing the file, {torch_mb} MB importing torch")
    assert peak_mb < torch_mb + 300, (peak_mb, torch_mb)  # the network alone would be 1,700 MB


# ---------------------------------------------------------------------------------------------------------------
# --resume: the state is a checkpoint of the same shape; a flag that differs takes effect or stops the run


def start_training(root, *args):
    return subprocess.Popen([sys.executable, str(REPO / "mytrain.py"), *map(str, args)], cwd=root,
                            env={**os.environ, **QUIET}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def resume(root, *flags):
    return run(REPO / "mytrain.py", "--bits", 8, "--resume", *flags, cwd=root, check=False, env=QUIET)


def test_kill_9_then_resume_with_flags_that_take_effect_or_stop(tmp_path):
    make_dataset(tmp_path / "data", classes=2, train_per_class=8, test_per_class=2, query_per_class=2)
    process = start_training(tmp_path, "--bits", 8, "--epochs", 3, *TRAIN_FLAGS, "--batch-size", 8)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "model").glob("8bits_*.resume")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs, nothing is tidied up
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    path = next((tmp_path / "model").glob("8bits_*.resume"))
    assert not list((tmp_path / "model").glob("*.pt"))  # only finished models are .pt files
    state = net.read_checkpoint(path, "a resume state")
    assert state["model_args"]["bits"] == 8 and {"optimizer", "generator", "run_stem"} <= state.keys()
    done = state["epoch"] + 1  # epochs completed before the kill
    assert done in (1, 2)

    # a flag about what is trained (every flag outside mytrain.RESUME_MAY_CHANGE takes this one path), and too few
    # epochs
    for flags, named in ((("--recipe", "dlbhc"), "--recipe dlbhc"), (("--epochs", done), f"--epochs {done}")):
        line = one_line_error(resume(tmp_path, *flags), named)
        assert "--resume" in line or "completed" in line
    assert path.exists()

    same = ("--img-size", 64, "--workers", 1, "--epochs", 4)  # one as saved, two that differ and take effect
    result = resume(tmp_path, *same)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--workers 1 takes effect (the run began with --workers 0)" in result.stdout
    assert "--epochs 4 takes effect (the run began with --epochs 3)" in result.stdout
    assert "--img-size" not in result.stdout.split('{"args"')[0]
    assert f"from epoch {done + 1} of 4" in result.stdout
    epochs_run = [json.loads(line)["epoch"] for line in result.stdout.splitlines() if line.startswith('{"epoch"')]
    assert epochs_run == list(range(done + 1, 5))
    model = next((tmp_path / "model").glob("8bits_*.pt"))
    checkpoint = net.read_checkpoint(model)
    assert checkpoint["epoch"] == 4 and checkpoint["args"]["epochs"] == 4 and checkpoint["args"]["workers"] == 1
    assert "optimizer" not in checkpoint
    log = [json.loads(line)["epoch"] for line in model.with_suffix(".jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    assert not list((tmp_path / "model").glob("*.resume"))
    one_line_error(resume(tmp_path), "nothing to resume")


def test_a_resume_state_of_an_earlier_mytrain_is_named(tmp_path):
    """Resume states before model_args (top-level state_dict, optimizer, args) are not converted: named instead."""
    make_dataset(tmp_path / "data", classes=2, train_per_class=1, test_per_class=1, query_per_class=1)
    (tmp_path / "model").mkdir()
    old = {"state_dict": {}, "optimizer": {}, "generator": torch.zeros(8, dtype=torch.uint8), "epoch": 0,
           "train_seconds": 1.0, "run_stem": "8bits_20250101-000000", "args": FORMAT1["fields"]["args"]}
    torch.save(old, tmp_path / "model/8bits_20250101-000000.resume")
    one_line_error(resume(tmp_path), "8bits_20250101-000000.resume", "earlier mytrain.py", "delete")


@pytest.mark.parametrize("field, value, named", [("run_stem", "../../elsewhere", "run_stem"), ("epoch", "1", "epoch"),
                                                 ("generator", [1, 2], "generator"), ("args", {"lr": "0.1"}, "--lr")])
def test_a_resume_state_with_a_field_of_the_wrong_type_is_refused(tmp_path, field, value, named):
    """Its run_stem names the files the run writes and its args become the run's flags: each is checked."""
    make_dataset(tmp_path / "data", classes=2, train_per_class=1, test_per_class=1, query_per_class=1)
    net_args = net.model_args(8, ["0", "1"], 64, "bnconv", 0.0)
    # the tensors matter only once the other fields have passed, as args must (its flags are checked by mytrain.py)
    model = net.build_model(net_args).state_dict() if field == "args" else {}
    state = {"format": 2, "model_args": net_args, "model": model, "optimizer": {}, "epoch": 0, "train_seconds": 1.0,
             "generator": torch.zeros(8, dtype=torch.uint8), "run_stem": "8bits_20250101-000000",
             "args": FORMAT1["fields"]["args"]}
    state[field] = {**state["args"], **value} if field == "args" else value
    (tmp_path / "model").mkdir()
    torch.save(state, tmp_path / "model/8bits_20250101-000000.resume")
    one_line_error(resume(tmp_path), "8bits_20250101-000000.resume", named)
    assert not list(tmp_path.glob("elsewhere*")) and not (tmp_path / "data/image/.cache").exists()
