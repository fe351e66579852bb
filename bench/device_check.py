"""Check a CUDA machine in one command (about 5 minutes on one GPU): tests, training, encoding, mAP.py, scaling.

    python bench/device_check.py --source /path/to/fashion-mnist     # the folder of the four idx files
    python bench/device_check.py --source /usr/share/datasets/fashion-mnist --train-per-class 2000

What it runs, each step a real command line, in --scratch (default result/device_check/):
  1. the CUDA-only tests: python -m pytest -q -m cuda tests
  2. prepare_data.py fashion-mnist from --source (the GPU machine needs no internet), --train-per-class images a class
  3. mytrain.py at 224 px for --epochs epochs on one GPU: training images/s from its log
  4. database.py, then mAP.py on the GPU and on the CPU: the same metrics, and how much faster
  5. with several visible GPUs: mytrain.py under torchrun on all of them, scaling efficiency against one
  6. bench/train.py's measurement at 224 px on the same images: the bare training step (ceiling), a PIL DataLoader
     pipeline and mytrain.py's pipeline, and encoding against a bare forward pass
and writes result/device_check.json with every figure and the targets: training >= 0.9 of the bare step and
>= 10x the PIL pipeline, encoding >= 0.9 of its ceiling, scaling efficiency >= 0.9. Without CUDA it says so in one
line and exits 2.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

from stage import UserError, print_args, run_main, write_json  # noqa: E402

TARGETS = {"train_vs_bare_step": 0.9, "train_vs_pil_pipeline": 10.0, "encode_vs_ceiling": 0.9, "ddp_efficiency": 0.9}


def get_args_parser():
    parser = argparse.ArgumentParser("bench/device_check.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder holding Fashion-MNIST's four idx files (.gz or not)")
    parser.add_argument("--scratch", default="result/device_check", help="where data, models and databases go "
                        "(default: %(default)s)")
    parser.add_argument("--result", default="result", help="where device_check.json goes (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=2000,
                        help="Fashion-MNIST training images per class (default: %(default)s)")
    parser.add_argument("--test-per-class", type=int, default=300, help="test images (queries) per class "
                        "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs at 224 px (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per pipeline in bench/train.py "
                        "(default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    # a dry run of every step on the CPU at a tiny size, for the repository's own test; not a way to check anything
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def command(name, args, log, env=None, timeout=600):
    """Run `python ARGS` from the repository root; returns (stdout, seconds). A failure is recorded and raised."""
    started = time.perf_counter()
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            env=full_env, timeout=timeout)
    seconds = round(time.perf_counter() - started, 2)
    log[name] = {"command": " ".join(map(str, ["python", *args])), "exit": result.returncode, "seconds": seconds}
    print(f"{name}: exit {result.returncode} in {seconds} s", flush=True)
    if result.returncode != 0:
        log[name]["tail"] = (result.stdout[-1500:] + result.stderr[-1500:]).strip()
        raise StepFailed(f"{name} failed (exit {result.returncode}): {log[name]['tail'][-300:]}")
    return result.stdout, seconds


class StepFailed(Exception):
    """A step whose command failed: recorded in device_check.json; the remaining steps that need it are skipped."""


def cuda_tests(report):
    out, _ = command("cuda_tests", ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                     report["steps"])
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|skipped|failed|deselected)", line)]
    report["cuda_tests"] = summary[-1] if summary else out.strip().splitlines()[-1:]


def train(args, paths, report, device):
    """mytrain.py on one GPU; training images/s: the best epoch of its log (the first includes cuDNN's tuning)."""
    command("prepare", ["prepare_data.py", "fashion-mnist", "--source", args.source, "--data-root", paths["data"],
                        "--limit-per-class", args.train_per_class, "--limit-test-per-class", args.test_per_class],
            report["steps"])
    train_args = ["mytrain.py", "--bits", 48, "--pretrained", "none", "--img-size", args.img_size, "--epochs",
                  args.epochs, "--batch-size", args.batch_size, "--device", device, "--data-root", paths["data"],
                  "--model-dir", paths["model"], "--result", paths["result"]]
    out, _ = command("train", train_args, report["steps"])
    epochs = [json.loads(line) for line in out.splitlines() if line.startswith('{"epoch"')]
    report["train"] = {"epochs": epochs, "images_per_second": max(e["images_per_second"] for e in epochs),
                       "final": json.loads(out.strip().splitlines()[-1])}
    return train_args


def pipelines(args, paths, report, device):
    """bench/train.py's measurement on the Fashion-MNIST training list: the bare step (ceiling), a PIL DataLoader
    pipeline, mytrain.py's pipeline, and encoding against a bare forward pass; in this process, then freed."""
    import torch

    from train import bench_set  # bench/train.py, beside this file

    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = argparse.Namespace(img_size=args.img_size, batch_size=args.batch_size, steps=args.steps, rounds=2,
                                  workers=min(16, os.cpu_count() or 1))
    started = time.perf_counter()
    row = bench_set("fashion-mnist", paths["data"] / "image", "trainlist.txt", settings, torch.device(device))
    keys = ("ceiling", "mytrain", "standard", "encode", "encode_ceiling")
    report["pipelines"] = {"images_per_second": {k: round(row[k], 1) for k in keys}, "settings": vars(settings)}
    report["steps"]["pipelines"] = {"seconds": round(time.perf_counter() - started, 2)}
    print(f"pipelines: {report['pipelines']['images_per_second']}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()


def encode_and_rank(args, paths, report, device):
    """database.py, then mAP.py on the GPU and on the CPU: the metrics must agree, integer for integer."""
    out, seconds = command("database", ["database.py", "--bits", 48, "--device", device, "--data-root", paths["data"],
                                        "--model-dir", paths["model"], "--out", paths["database"],
                                        "--result", paths["result"]], report["steps"])
    counts = json.loads(out.strip().splitlines()[-1])
    report["database"] = {**counts, "images_per_second_with_startup":
                          round((counts["num_database"] + counts["num_queries"]) / counts["seconds"], 1)}
    maps = {}
    for where in (device, "cpu"):
        command(f"map_{where}", ["mAP.py", "--bits", 48, "--database", paths["database"], "--device", where,
                                 "--result", paths["result"] / f"map_{where}"], report["steps"])
        maps[where] = json.loads((paths["result"] / f"map_{where}" / "map_48bits.json").read_text())
    keys = ("map_all", "map_topk", "precision_r2", "recall_r2")
    report["map"] = {where: {k: maps[where][k] for k in (*keys, "seconds")} for where in maps}
    report["map"]["same_metrics"] = all(maps[device][k] == maps["cpu"][k] for k in keys)
    report["map"]["speedup"] = round(maps["cpu"]["seconds"] / max(maps[device]["seconds"], 1e-6), 2)


def ddp_scaling(args, train_args, paths, report, gpus):
    """mytrain.py under torchrun on every visible GPU against one GPU: efficiency = (N-GPU img/s) / (N x 1-GPU)."""
    one = report["train"]["images_per_second"]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", gpus]
    # the same batch per GPU as the one-GPU run (weak scaling): --batch-size is the global batch
    ddp_args = [*train_args, "--batch-size", args.batch_size * gpus, "--model-dir", paths["model_ddp"]]
    out, _ = command("train_ddp", [*launch, *ddp_args], report["steps"])
    epochs = [json.loads(line) for line in out.splitlines() if line.startswith('{"epoch"')]
    many = max(e["images_per_second"] for e in epochs)
    report["ddp"] = {"gpus": gpus, "images_per_second": many, "one_gpu": one,
                     "efficiency": round(many / (gpus * one), 3), "epochs": epochs}


def verdicts(report):
    """Each target with its measured value and whether it is met (None where it could not be measured)."""
    pipes = report.get("pipelines", {}).get("images_per_second", {})
    train = report.get("train", {}).get("images_per_second")
    measured = {
        "train_vs_bare_step": train / pipes["ceiling"] if train and pipes else None,
        "train_vs_pil_pipeline": train / pipes["standard"] if train and pipes else None,
        "encode_vs_ceiling": pipes["encode"] / pipes["encode_ceiling"] if pipes else None,
        "ddp_efficiency": report.get("ddp", {}).get("efficiency"),
    }
    return {name: {"target": TARGETS[name], "measured": None if value is None else round(value, 3),
                   "met": None if value is None else value >= TARGETS[name]} for name, value in measured.items()}


def main():
    args = get_args_parser().parse_args()
    import torch  # after parsing: --help answers at once

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise UserError("no CUDA GPU is visible here: bench/device_check.py checks a GPU; run it on a machine with one")
    print_args(args)
    cuda = torch.cuda.is_available()
    device, gpus = ("cuda", torch.cuda.device_count()) if cuda else ("cpu", 0)
    scratch = Path(args.scratch).resolve()
    paths = {name: scratch / name for name in ("data", "model", "model_ddp", "database", "result")}
    report = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU dry run ({os.cpu_count()} cores)",
              "gpus": gpus, "torch": torch.__version__, "args": vars(args), "steps": {}}
    started = time.perf_counter()
    try:
        cuda_tests(report)
        train_args = train(args, paths, report, device)
        encode_and_rank(args, paths, report, device)
        if gpus > 1:
            ddp_scaling(args, train_args, paths, report, gpus)
        pipelines(args, paths, report, device)
    except (StepFailed, subprocess.TimeoutExpired) as err:
        report["failed"] = str(err)
    report["targets"] = verdicts(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(args.result) / "device_check.json"
    write_json(path, report)
    for name, verdict in report["targets"].items():
        print(f"{name:24s} measured {verdict['measured']}  target {verdict['target']}  met {verdict['met']}")
    print(f"wrote {path} in {report['seconds']} s" + (f"; FAILED: {report['failed']}" if "failed" in report else ""))
    if "failed" in report:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
