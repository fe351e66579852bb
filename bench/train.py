"""Training and encoding throughput: the standard input pipeline, mytrain.py's, and the bare model step.

    python bench/train.py                                   # CPU here: 64 px; CUDA: 224 px
    python bench/train.py --img-size 224 --steps 50 --batch-size 256 --device cuda

Three ways to feed the same training step (forward, cross-entropy, backward, AdamW step), timed on the same model
in the same process, on two image sets: data/image/trainlist.txt (the Fashion-MNIST default, 28 px grey) and
CIFAR-10-sized colour images (32 px, generated under --scratch when absent):
  standard   a torchvision DataLoader: PIL decode, Resize, RandomCrop, flip, ToTensor, Normalize in --workers
             processes, pinned memory
  mytrain    mytrain.py's pipeline: the decoded uint8 cache, crop/flip/resize/normalise on the device
  ceiling    the step alone on tensors already on the device
and encoding (database.py's path against a forward pass on device tensors). Prints a table and writes
result/bench_train.json. Ratios are what to compare: this machine is shared and noisy.

    python bench/train.py --device cpu --parts step           # the CPU step configurations only
    python bench/train.py --device cpu --parts step --configs fp32 bf16 "bf16 channels_last"

--parts step times the ceiling's training step (and the encoding forward pass) under CPU configurations:
fp32 or bf16 autocast, channels_last or not, 1 thread, oneDNN off, oneDNN's fp32 convolutions and matmuls in bf16,
torch.compile (its compile time reported), AdamW's loop over parameters (mytrain.py --no-fused) instead of the
fused kernel that every other configuration uses, as mytrain.py does, and fc6 after the 6 x 6 pool instead of on
the 1 x 1 maps' pixel (net.AlexNetPlusLatent.fc6_of_one_pixel), which every other one takes below about 100 px.
The configurations run interleaved, A B C A B C ..., and each is reported as its step time over fp32's in the same
round: the median and range over rounds.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import MyDataset  # noqa: E402
from database import encode  # noqa: E402
from net import (IMAGENET_MEAN, IMAGENET_STD, AlexNetPlusLatent, autocast, cpu_has_native_bf16, hashing_loss,  # noqa: E402
                 model_args, pick_device)
from stage import UserError, common_args_parser, positive_int, print_args, run_main, write_json  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("bench/train.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser()])
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: 224 on CUDA, 64 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="(default: 256 on CUDA, 128 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per pipeline (default: 50 on CUDA, 8 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--scratch", default="data/bench", help="where generated images go (default: %(default)s)")
    parser.add_argument("--result", default="result", help="(default: %(default)s)")
    parser.add_argument("--parts", nargs="+", default=["input", "step"], choices=("input", "step"),
                        help="input: the three input pipelines; step: the step configurations (default: input step)")
    parser.add_argument("--configs", nargs="+", default=[name for name, _ in STEP_CONFIGS],
                        choices=[name for name, _ in STEP_CONFIGS], metavar="NAME",
                        help="step configurations to time, fp32 always among them (default: all: "
                             + ", ".join(name for name, _ in STEP_CONFIGS) + ")")
    parser.add_argument("--config-steps", type=positive_int, default=2, help="timed steps per configuration and round (default: %(default)s)")
    return parser


# name: settings; fp32 (contiguous, eager, every thread, oneDNN on) is the reference of every ratio
STEP_CONFIGS = (
    ("fp32", {}),
    ("fp32 pooled fc6", {"pooled_fc6": True}),
    ("fp32 AdamW loop", {"fused": False}),
    ("fp32 channels_last", {"channels_last": True}),
    ("fp32 channels_last pooled fc6", {"channels_last": True, "pooled_fc6": True}),
    ("bf16", {"bf16": True}),
    ("bf16 channels_last", {"bf16": True, "channels_last": True}),
    ("fp32 1 thread", {"threads": 1}),
    ("bf16 channels_last 1 thread", {"bf16": True, "channels_last": True, "threads": 1}),
    ("fp32 oneDNN off", {"mkldnn": False}),
    ("fp32 oneDNN math in bf16", {"fp32_precision": "bf16"}),
    ("fp32 compiled", {"compile": True}),
    ("bf16 channels_last compiled", {"bf16": True, "channels_last": True, "compile": True}),
)


def colour_set(folder, count=5000, classes=10):
    """CIFAR-10-sized (32 x 32 RGB PNG) images with a trainlist, generated once."""
    folder = Path(folder)
    listing = folder / "trainlist.txt"
    if listing.is_file():
        return folder
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        label = i % classes
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // 2 + np.uint8(label * 12)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {label}\n")
    listing.write_text("".join(lines))
    return folder


class Step:
    """One training step of AlexNetPlusLatent on normalised images already on the device."""

    def __init__(self, classes, device, args):
        self.device = device
        self.model = AlexNetPlusLatent(48, classes, "bn", 0.0).to(device).train()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # as mytrain.py's

    def __call__(self, x, labels):
        with autocast(self.device):
            codes, logits, _ = self.model(x)
        loss = hashing_loss(codes.float(), logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(batches, work, steps, device, warmup=2):
    """Images per second over `steps` batches after `warmup` untimed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        work(*next(iterator))
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        x, labels = next(iterator)
        work(x, labels)
        images += len(labels)
    sync(device)
    return images / (time.perf_counter() - start)


def forever(make):
    while True:
        yield from make()


def standard_batches(folder, entries, labels, img_size, batch_size, workers, device):
    """The usual torchvision pipeline, every transform on the CPU in DataLoader workers."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((img_size * 8 // 7, img_size * 8 // 7)), transforms.RandomCrop(img_size),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    class Standard(torch.utils.data.Dataset):
        def __len__(self):
            return len(entries)

        def __getitem__(self, i):
            return transform(MyDataset.read_image(Path(folder) / entries[i].path)), int(labels[i])

    loader = torch.utils.data.DataLoader(Standard(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)

    def batches():
        for x, y in loader:
            yield (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   y.to(device, non_blocking=True))

    return forever(batches)


def bench_set(name, folder, listing, args, device):
    entries = MyDataset.read_list(Path(folder) / listing, need_label=True)
    classes = MyDataset.training_classes(entries)
    labels = MyDataset.class_indices(entries, classes, listing)
    step = Step(len(classes), device, args)
    source = MyDataset.ImageSource(folder, entries, labels, args.img_size, f"bench_{Path(listing).stem}",
                                   workers=args.workers, device=device)
    generator = torch.Generator().manual_seed(0)

    def mytrain_batches():
        for images, batch_labels, _ in source.batches(args.batch_size, generator):
            if len(batch_labels) == args.batch_size:
                yield MyDataset.train_transform(images, args.img_size, IMAGENET_MEAN, IMAGENET_STD, generator), batch_labels

    resident_x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    resident_x = resident_x.contiguous(memory_format=torch.channels_last)
    resident_y = torch.randint(0, len(classes), (args.batch_size,), device=device)
    row = {"set": name, "images": len(entries), "store_size": list(source.size)}
    pipelines = {
        "ceiling": forever(lambda: [(resident_x, resident_y)]),
        "mytrain": forever(mytrain_batches),
        "standard": standard_batches(folder, entries, labels, args.img_size, args.batch_size, args.workers, device),
    }
    for _ in range(args.rounds):  # interleaved rounds, best of each: a busy neighbour slows every pipeline alike
        for pipeline, batches in pipelines.items():
            row[pipeline] = max(row.get(pipeline, 0.0), timed(batches, step, args.steps, device))

    net_args = model_args(48, classes, args.img_size, "bn", 0.0)
    model = step.model.eval()
    encode_count = min(len(source), args.batch_size * args.steps)
    source = source.first(encode_count)
    encode(model, net_args, source, device, args.batch_size)  # warm-up, like the ceiling's untimed batches
    row["encode"] = 0.0
    for _ in range(args.rounds):
        start = time.perf_counter()
        encode(model, net_args, source, device, args.batch_size)
        sync(device)
        row["encode"] = max(row["encode"], encode_count / (time.perf_counter() - start))

    @torch.no_grad()
    def forward(x, _):
        with autocast(device):
            model(x)

    row["encode_ceiling"] = timed(forever(lambda: [(resident_x, resident_y)]), forward, args.steps, device)
    return row


class ConfiguredStep:
    """The ceiling's training step and database.py's forward pass, on the CPU, under one STEP_CONFIGS setting."""

    def __init__(self, settings, classes):
        torch.manual_seed(0)  # every configuration starts from the same weights
        self.settings = settings
        self.precision = "bf16" if settings.get("bf16") else "fp32"
        self.model = AlexNetPlusLatent(48, classes, "bnconv", 0.0).train()
        self.model.fc6_on_pixel = not settings.get("pooled_fc6")
        if settings.get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if settings.get("compile") else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=settings.get("fused", True))

    @contextlib.contextmanager
    def environment(self, threads):
        """This configuration's intra-op threads and oneDNN flags, restored on the way out."""
        mkldnn = torch.backends.mkldnn
        saved = (torch.get_num_threads(), mkldnn.enabled, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision)
        torch.set_num_threads(self.settings.get("threads", threads))
        mkldnn.enabled = self.settings.get("mkldnn", True)
        if "fp32_precision" in self.settings:
            mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = self.settings["fp32_precision"]
        try:
            yield
        finally:
            torch.set_num_threads(saved[0])
            mkldnn.enabled, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = saved[1:]

    def step(self, x, labels):
        with autocast(torch.device("cpu"), self.precision):
            codes, logits, _ = self.step_model(x)
        loss = hashing_loss(codes.float(), logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def encode(self, x):
        """database.py's forward pass (eval mode, no gradients); the eager model: a compiled one would recompile."""
        self.model.eval()
        with autocast(torch.device("cpu"), self.precision):
            codes, _, _ = self.model(x)
        (codes.float() > 0.5).numpy()
        self.model.train()


def seconds_per_call(work, calls):
    start = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - start) / calls


def prepare_configs(args, x, labels, threads):
    """{name: ConfiguredStep} after an untimed step each (two when compiled: the first compiles), {name: record}."""
    steps, results = {}, {}
    for name in args.configs:
        settings = dict(STEP_CONFIGS)[name]
        try:
            configured = ConfiguredStep(settings, 10)
            with configured.environment(threads):
                start = time.perf_counter()
                configured.step(x, labels)
                first = time.perf_counter() - start
                if settings.get("compile"):
                    configured.step(x, labels)
        except Exception as err:  # a compiler missing, a flag this oneDNN refuses: recorded, the others still run
            results[name] = {"settings": settings, "skipped": f"{type(err).__name__}: {str(err).strip()[:300]}"}
            print(f"{name}: skipped ({results[name]['skipped'].splitlines()[0]})", flush=True)
            continue
        steps[name] = configured
        results[name] = {"settings": settings, "first_step_s": first, "step_s": [], "encode_s": []}
        print(f"{name}: first step {first:.1f} s", flush=True)
    return steps, results


def ratio_summary(times, reference):
    """Speed-up over fp32 per round (fp32's time / this one's, same round): median, min, max."""
    ratios = sorted(ref / t for t, ref in zip(times, reference))
    return {"median": float(np.median(ratios)), "min": ratios[0], "max": ratios[-1]}


def bench_configs(args, save):
    """Interleaved rounds over the step configurations; speed-ups relative to fp32 in the same round.

    save(results) is called after every round, so a run stopped early keeps the rounds it finished."""
    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)  # contiguous, as mytrain's
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
    steps, results = prepare_configs(args, x, labels, threads)
    for round_index in range(args.rounds):
        for name, configured in steps.items():
            with configured.environment(threads):
                results[name]["step_s"].append(seconds_per_call(lambda: configured.step(x, labels), args.config_steps))
                if not configured.settings.get("compile"):
                    results[name]["encode_s"].append(seconds_per_call(lambda: configured.encode(x), args.config_steps))
            print(f"round {round_index + 1}/{args.rounds} {name}: step {results[name]['step_s'][-1]:.2f} s", flush=True)
        summarise(steps, results)
        save(results)
    return results


def summarise(steps, results):
    for name in steps:
        record = results[name]
        record["step_speedup"] = ratio_summary(record["step_s"], results["fp32"]["step_s"])
        if record["encode_s"]:
            record["encode_speedup"] = ratio_summary(record["encode_s"], results["fp32"]["encode_s"])
        if steps[name].settings.get("compile"):
            record["compile_s"] = record["first_step_s"] - float(np.median(record["step_s"]))


def print_configs(results, threads):
    print(f"\nCPU step configurations ({cpu_name()}, native bf16: {cpu_has_native_bf16()}, {threads} threads "
          f"unless named); speed-up = fp32's time / this one's, same round: median [min-max]")
    print(f"{'configuration':30s} {'step s':>7s} {'step speed-up':>19s} {'encode speed-up':>19s} {'compile s':>9s}")
    for name, record in results.items():
        if "skipped" in record:
            print(f"{name:30s} skipped: {record['skipped'].splitlines()[0][:80]}")
            continue
        cells = []
        for key in ("step_speedup", "encode_speedup"):
            ratio = record.get(key)
            cells.append(f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]" if ratio else "-")
        compile_s = f"{record['compile_s']:.0f}" if "compile_s" in record else "-"
        print(f"{name:30s} {np.median(record['step_s']):7.2f} {cells[0]:>19s} {cells[1]:>19s} {compile_s:>9s}")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def main():
    args = get_args_parser().parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.img_size = args.img_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 128)
    args.steps = args.steps or (50 if cuda else 8)
    args.configs = ["fp32"] + [name for name in args.configs if name != "fp32"]
    if "step" in args.parts and cuda:
        raise UserError("--parts step times CPU configurations; run it with --device cpu")
    print_args(args)
    if cuda:
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    rows = bench_inputs(args, device) if "input" in args.parts else []

    def save(configs):
        write_json(Path(args.result) / "bench_train.json",
                   {"device": device_name, "native_bf16": cpu_has_native_bf16(), "args": vars(args), "rows": rows,
                    "configurations": configs, "load_average": list(os.getloadavg()),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    configs = bench_configs(args, save) if "step" in args.parts else {}
    if rows:
        print_inputs(rows, device_name, args)
    if configs:
        print_configs(configs, torch.get_num_threads())
    save(configs)


def bench_inputs(args, device):
    """The three input pipelines on each image set: one row per set."""
    sets = []
    default = Path(args.data_root) / "image"
    if (default / "trainlist.txt").is_file():
        sets.append(("fashion-mnist (data/image)", default, "trainlist.txt"))
    sets.append(("cifar-sized colour (generated)", colour_set(Path(args.scratch) / "colour"), "trainlist.txt"))
    rows = []
    for name, folder, listing in sets:
        row = bench_set(name, folder, listing, args, device)
        rows.append(row)
        print(f"{name}: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})}",
              flush=True)
    return rows


def print_inputs(rows, device_name, args):
    print(f"\n{device_name}, {args.img_size} px, batch {args.batch_size}, images/s")
    print(f"{'set':34s} {'standard':>9s} {'mytrain':>9s} {'ceiling':>9s} {'mytrain/ceil':>12s} "
          f"{'encode':>9s} {'enc ceil':>9s} {'enc/ceil':>8s}")
    for row in rows:
        print(f"{row['set']:34s} {row['standard']:9.0f} {row['mytrain']:9.0f} {row['ceiling']:9.0f} "
              f"{row['mytrain'] / row['ceiling']:12.2f} {row['encode']:9.0f} {row['encode_ceiling']:9.0f} "
              f"{row['encode'] / row['encode_ceiling']:8.2f}")


if __name__ == "__main__":
    run_main(main)
