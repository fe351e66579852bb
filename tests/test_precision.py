"""mytrain.py --precision and --no-fused: which autocast each choice gives, byte-identical codes from the same model,
data and seed, and the fused optimizer against the loop over parameters."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, make_dataset, run

# the module's trained runs are made once: every test of it on one pytest-xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("precision")

# bf16 is emulated, and slow, on a CPU without AVX512_BF16/AMX: one epoch of two steps is enough to compare bytes
TRAIN = ("--bits", 16, "--pretrained", "none", "--img-size", 64, "--epochs", 1, "--batch-size", 6,
         "--device", "cpu", "--workers", 0, "--seed", 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four tiny runs on one data set: bf16 twice and fp32, each encoded by database.py; and the default precision
    with the optimizer's loop over parameters (--no-fused), not encoded."""
    root = tmp_path_factory.mktemp("precision")
    make_dataset(root / "data", classes=3, train_per_class=4, test_per_class=2, query_per_class=2)
    outputs = {}
    for name, extra in (("bf16_a", ("--precision", "bf16")), ("bf16_b", ("--precision", "bf16")),
                        ("fp32", ("--precision", "fp32")), ("default_loop", ("--no-fused",))):
        result = run(REPO / "mytrain.py", *TRAIN, *extra, "--model-dir", f"model_{name}", cwd=root)
        model = next((root / f"model_{name}").glob("16bits_*.pt"))
        if name != "default_loop":
            run(REPO / "database.py", "--bits", 16, "--model", model, "--device", "cpu", "--workers", 0,
                "--out", f"db_{name}", cwd=root)
        outputs[name] = (model, root / f"db_{name}", result.stdout)
    return outputs


def weights(model_path):
    return torch.load(model_path, map_location="cpu", weights_only=True)["model"]


def same_bytes(db_a, db_b):
    return all((db_a / name).read_bytes() == (db_b / name).read_bytes()
               for name in ("db_binary.npy", "query_binary.npy", "db_feature.npy", "query_feature.npy"))


def test_bf16_twice_gives_byte_identical_weights_and_codes(runs):
    (model_a, db_a, _), (model_b, db_b, _) = runs["bf16_a"], runs["bf16_b"]
    first, second = weights(model_a), weights(model_b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert same_bytes(db_a, db_b)
    checkpoint = torch.load(model_a, map_location="cpu", weights_only=True)
    assert checkpoint["args"]["precision"] == "bf16"


def losses_of(run_):
    return [json.loads(line)["loss"] for line in run_[0].with_suffix(".jsonl").read_text().splitlines()]


def test_bf16_really_differs_from_fp32(runs):
    fp32, bf16 = weights(runs["fp32"][0]), weights(runs["bf16_a"][0])
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)
    assert not same_bytes(runs["fp32"][1], runs["bf16_a"][1])


def test_the_default_and_the_loop_over_parameters_train_as_fp32_fused(runs):
    """The run without --precision and with --no-fused: on the CPU the default precision is fp32
    (test_uses_bf16_rules), and the optimizer's loop over parameters makes the fused default's updates up to float32
    rounding, so the epoch's loss agrees with the fp32 fused run to 1e-4, while bf16's does not. (Single weights
    may not agree: a conv bias before a BatchNorm has a gradient of rounding noise, which Adam scales up to a full
    step of either sign.) Measured on such a model: the loss of the steps after the first agrees to 1e-6, while a
    parameter group's learning rate 10x off moves it by 1e-2."""
    fp32, loop, bf16 = (losses_of(runs[name]) for name in ("fp32", "default_loop", "bf16_a"))
    assert loop == pytest.approx(fp32, rel=1e-4)
    assert bf16 != pytest.approx(fp32, rel=1e-4)  # the tolerance tells the precisions apart
    saved = {name: torch.load(runs[name][0], map_location="cpu", weights_only=True)["args"]
             for name in ("fp32", "default_loop")}
    assert (saved["fp32"]["precision"], saved["fp32"]["no_fused"]) == ("fp32", False)
    assert (saved["default_loop"]["precision"], saved["default_loop"]["no_fused"]) == ("auto", True)


def test_a_bf16_step_follows_the_fp32_gradient():
    """One training step's gradient under CPU bf16 autocast points where fp32's does: a broken autocast path
    (a layer left out, the loss taken in bf16) cannot land."""
    import net

    torch.manual_seed(0)
    model = net.AlexNetPlusLatent(16, 3, "bnconv", 0.0).train()
    x, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    gradients = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with net.autocast(torch.device("cpu"), precision):
            codes, logits, _ = model(x)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        gradients[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    cosine = torch.nn.functional.cosine_similarity(gradients["fp32"], gradients["bf16"], dim=0)
    assert cosine > 0.98, cosine


def test_uses_bf16_rules():
    import net

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: CUDA is not initialised
    assert net.uses_bf16(cuda) and net.uses_bf16(cuda, "bf16") and not net.uses_bf16(cuda, "fp32")
    assert not net.uses_bf16(cpu) and not net.uses_bf16(cpu, "fp32") and net.uses_bf16(cpu, "bf16")
    with pytest.raises(ValueError):
        net.uses_bf16(cpu, "fp16")


def test_every_layer_runs_in_bf16_under_cpu_autocast():
    """No layer of the network lacks a CPU bf16 kernel: each one's output is bf16 (none falls back to fp32)."""
    import net

    model = net.AlexNetPlusLatent(16, 3, "bnconv", 0.0).train()
    dtypes = {}
    for name, module in model.named_modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype))
    x = torch.randn(4, 3, 64, 64)
    with net.autocast(torch.device("cpu"), "bf16"):
        codes, logits, fc7 = model(x)
    assert set(dtypes.values()) == {torch.bfloat16}, {k: v for k, v in dtypes.items() if v != torch.bfloat16}
    with net.autocast(torch.device("cpu")):
        reference = model(x)
    assert all(t.dtype == torch.float32 for t in reference)
    # bf16 keeps 8 bits of mantissa: the codes agree with fp32's to a few hundredths
    np.testing.assert_allclose(codes.float().detach().numpy(), reference[0].detach().numpy(), atol=0.05)
