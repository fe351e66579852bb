"""Retrieval quality under the standard protocol, through the real scripts, for several code lengths.

    python bench/quality.py --quick                 # the CPU quick mode: 600 train/database + 50 queries per class, 64 px
    python bench/quality.py                         # full Fashion-MNIST at 224 px (a GPU's job)
    python bench/quality.py --quick --bits 48       # one code length

Protocol: Fashion-MNIST's test split as queries, its training split as database, no ImageNet weights
(--pretrained none), every mytrain.py flag at its default except size, resolution and duration. For each code length
it runs mytrain.py, database.py and mAP.py in --work, then prints a table and writes result/bench_quality.json:
mAP over the full ranking, mAP@1000, precision within Hamming radius 2, test accuracy, training time, device.
Extra mytrain.py flags go after `--`, e.g. `-- --recipe dlbhc`.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from net import newest_model, read_checkpoint  # noqa: E402
from stage import UserError, print_args, run_main, write_json  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("bench/quality.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CPU quick mode (subset, 64 px, 14 epochs, as run.sh)")
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 32, 48, 64], help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: %(default)s)")
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files (default: %(default)s)")
    parser.add_argument("--work", default="bench_quality", help="scratch folder for data, models, databases (default: %(default)s)")
    parser.add_argument("--result", default="result", help="(default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("train_args", nargs="*", help="extra mytrain.py flags, after --")
    return parser


def script(name, *args):
    """Run one of the repo's scripts; its output streams through, its failure stops the benchmark."""
    command = [sys.executable, str(REPO / name), *map(str, args)]
    print("+", " ".join(command[1:]), flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"{name} failed; see its message above")


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    work = Path(args.work)
    data = work / ("data_quick" if args.quick else "data_full")
    limits = ["--limit-per-class", 600, "--limit-test-per-class", 50] if args.quick else []
    script("prepare_data.py", "fashion-mnist", "--source", args.source, "--data-root", data, *limits)
    size = ["--img-size", 64, "--epochs", 14] if args.quick else []
    rows = []
    for bits in args.bits:
        models, db, result = work / f"model_{bits}", work / f"database_{bits}", work / f"result_{bits}"
        started = time.perf_counter()
        script("mytrain.py", "--bits", bits, "--pretrained", "none", "--device", args.device, "--data-root", data,
               "--model-dir", models, *size, *args.train_args)
        wall = time.perf_counter() - started
        model = newest_model(models, bits)
        script("database.py", "--bits", bits, "--model", model, "--device", args.device, "--data-root", data, "--out", db)
        script("mAP.py", "--bits", bits, "--database", db, "--result", result, "--device", args.device)
        metrics = json.loads((result / f"map_{bits}bits.json").read_text())
        checkpoint = read_checkpoint(model)
        rows.append({"bits": bits, "map_all": metrics["map_all"], "map_1000": metrics["map_topk"],
                     "precision_r2": metrics["precision_r2"], "accuracy": checkpoint["test_accuracy"],
                     "train_seconds": checkpoint["train_seconds"], "wall_seconds": round(wall, 1),
                     "device": checkpoint["device"], "recipe": checkpoint["model_args"]["recipe"], "model": str(model)})
    print(f"\n{'bits':>4s} {'mAP@all':>8s} {'mAP@1000':>8s} {'P(r<=2)':>8s} {'accuracy':>8s} {'train s':>8s}  device")
    for row in rows:
        print(f"{row['bits']:4d} {row['map_all']:8.4f} {row['map_1000']:8.4f} {row['precision_r2']:8.4f} "
              f"{row['accuracy']:8.4f} {row['train_seconds']:8.1f}  {row['device']}")
    write_json(Path(args.result) / f"bench_quality{'_quick' if args.quick else ''}.json",
               {"args": vars(args), "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


if __name__ == "__main__":
    run_main(main)
