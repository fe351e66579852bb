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
"""
import argparse
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
from net import IMAGENET_MEAN, IMAGENET_STD, AlexNetPlusLatent, autocast, hashing_loss, model_args, pick_device  # noqa: E402
from stage import common_args_parser, print_args, run_main, write_json  # noqa: E402


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
    return parser


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
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

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


def main():
    args = get_args_parser().parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.img_size = args.img_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 128)
    args.steps = args.steps or (50 if cuda else 8)
    print_args(args)
    if cuda:
        torch.backends.cudnn.benchmark = True
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
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device_name}, {args.img_size} px, batch {args.batch_size}, images/s")
    print(f"{'set':34s} {'standard':>9s} {'mytrain':>9s} {'ceiling':>9s} {'mytrain/ceil':>12s} "
          f"{'encode':>9s} {'enc ceil':>9s} {'enc/ceil':>8s}")
    for row in rows:
        print(f"{row['set']:34s} {row['standard']:9.0f} {row['mytrain']:9.0f} {row['ceiling']:9.0f} "
              f"{row['mytrain'] / row['ceiling']:12.2f} {row['encode']:9.0f} {row['encode_ceiling']:9.0f} "
              f"{row['encode'] / row['encode_ceiling']:8.2f}")
    write_json(Path(args.result) / "bench_train.json", {"device": device_name, "args": vars(args), "rows": rows,
                                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


if __name__ == "__main__":
    run_main(main)
