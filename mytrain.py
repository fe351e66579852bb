"""Train AlexNetPlusLatent on data/image/trainlist.txt; report accuracy on testlist.txt after every epoch.

    python mytrain.py --bits 48                                      # ImageNet-initialised, as in DLBHC
    python mytrain.py --bits 48 --pretrained none --img-size 64 --device cpu --epochs 8    # the CPU quick mode
    python mytrain.py --bits 48 --resume                             # continue the last interrupted 48-bit run
    torchrun --nproc-per-node 8 mytrain.py --bits 48                 # 8 GPUs; --batch-size is the global batch
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT mytrain.py --bits 48

The finished model is saved as model/<bits>bits_<test accuracy %>.pt (e.g. model/48bits_91.37.pt, with _2, _3
where the name is taken), its per-epoch metrics beside it as <same name>.jsonl. While a run is going, its state
after each completed epoch is model/<bits>bits_<start time>.resume: not a .pt, so no stage takes it for a model.
Under torchrun rank 0 alone writes these files (README, Several GPUs and machines).

Multi-label lists (an image with two labels or more, MyDataset.read_list) train the classifier with sigmoid binary
cross-entropy, and the accuracy is then "the top-scoring class is among the image's labels"; the checkpoint stores
label_kind and accuracy_definition.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import MyDataset
from net import (IMAGENET_MEAN, IMAGENET_STD, RECIPES, AlexNetPlusLatent, all_reduce_sum, autocast, broadcast_buffers,
                 distributed_args_parser, distributed_run, from_main, load_pretrained, local_main_first, model_name,
                 safe_load, save_checkpoint, setup_ranks, unwrapped_state_dict, wrap_for_ranks)
from stage import (UserError, atomic_write, common_args_parser, fraction, int_in, non_negative_float, non_negative_int,
                   positive_float, positive_int, print_args, run_main, seed_int, to_json, write_text)


def get_args_parser():
    parser = argparse.ArgumentParser("mytrain.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(), distributed_args_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=positive_int, default=48, help="hash code length, 8..4096 (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=30, help="passes over trainlist (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="images per step, over all ranks under torchrun (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate (default: 3e-4 for AdamW, 0.01 for SGD); new layers get 10x when pretrained")
    parser.add_argument("--new-lr-scale", type=positive_float, default=None,
                        help="learning-rate multiplier of the latent and classifier layers when the rest is pretrained, "
                             "as in DLBHC's solver (default: 10 with --pretrained, 1 from scratch)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(default: %(default)s)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="(default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_float, default=1.0, help="linear warm-up, in epochs, before cosine decay (default: %(default)s)")
    parser.add_argument("--label-smoothing", type=fraction, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--binarize", type=non_negative_float, default=0.0,
                        help="weight of SSDH's term pushing latent outputs toward 0 or 1 (default: %(default)s)")
    parser.add_argument("--balance", type=non_negative_float, default=0.0,
                        help="weight of SSDH's term pushing each bit toward 50%% activation (default: %(default)s)")
    parser.add_argument("--dropout", type=fraction, default=None, help="fc6/fc7 dropout (default: 0.5 for --recipe dlbhc, 0 otherwise)")
    parser.add_argument("--recipe", default="bnconv", choices=RECIPES,
                        help="bnconv: BatchNorm after every conv and before the latent sigmoid; bn: before the latent sigmoid "
                             "only; dlbhc: the paper's network and loss (default: %(default)s)")
    parser.add_argument("--img-size", type=int_in(64, 4096), default=224, help="input size in pixels, >= 64 (default: %(default)s)")
    parser.add_argument("--pretrained", default="imagenet",
                        help="imagenet (torchvision's AlexNet weights), none (from scratch) or PATH of an AlexNet state_dict (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), help="processes decoding images (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    parser.add_argument("--model-dir", default="model", help="where models are saved (default: %(default)s)")
    parser.add_argument("--result", default="result", help="where bad_images.txt goes (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the newest interrupted run with these --bits")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, listed in result/bad_images.txt")
    parser.add_argument("--no-cache", action="store_true", help="stream images through DataLoader workers instead of the decoded cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; costs compile time up front)")
    parser.add_argument("--strict-paths", action="store_true",
                        help="refuse list entries outside data/image (absolute paths, ..) instead of warning")
    return parser


def check_args(args, ranks):
    if not 8 <= args.bits <= 4096:
        raise UserError(f"--bits {args.bits}: choose a code length from 8 to 4096")
    if args.img_size < 64:
        raise UserError(f"--img-size {args.img_size}: AlexNet needs at least 64 pixels")
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if args.batch_size < 2 * ranks.world_size:  # every rank trains on at least 2 images of each full batch
        raise UserError(f"--batch-size {args.batch_size} is the global batch, split over {ranks.world_size} ranks: "
                        f"give at least {2 * ranks.world_size}")
    if args.lr is None:
        args.lr = 3e-4 if args.optimizer == "adamw" else 0.01
    if args.new_lr_scale is None:
        args.new_lr_scale = 1.0 if args.pretrained == "none" else 10.0
    if args.dropout is None:
        args.dropout = 0.5 if args.recipe == "dlbhc" else 0.0


def make_optimizer(model, args):
    """The new layers (latent, classifier) learn args.new_lr_scale times faster, as in DLBHC's solver.

    From scratch every layer is new and all learn at one rate (measured: 10x there lowered accuracy, README).
    """
    new = {id(p) for p in model.new_layers()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in new], "lr_scale": 1.0},
        {"params": [p for p in model.parameters() if id(p) in new], "lr_scale": args.new_lr_scale},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def learning_rate(step, steps_per_epoch, args):
    """Linear warm-up for args.warmup epochs, then cosine decay to zero at the last step."""
    total = args.epochs * steps_per_epoch
    warmup = min(int(args.warmup * steps_per_epoch), total - 1)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def hashing_loss(codes, logits, labels, args):
    """DLBHC's cross-entropy on the classifier, plus SSDH's optional binarisation and bit-balance terms.

    Multi-label data (labels [B, C] multi-hot) takes sigmoid binary cross-entropy, one term per class.
    """
    if labels.ndim == 2:
        targets = labels.float() * (1 - args.label_smoothing) + args.label_smoothing / 2
        loss = F.binary_cross_entropy_with_logits(logits, targets)
    else:
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
    if args.binarize:
        loss = loss - args.binarize * (codes - 0.5).pow(2).mean()  # [B, bits]: larger when outputs sit near 0 or 1
    if args.balance:
        loss = loss + args.balance * (codes.mean(0) - 0.5).pow(2).mean()  # each bit on for half the batch
    return loss


ACCURACY = {"single": "top-1: the top-scoring class is the image's label",
            "multi": "top-1: the top-scoring class is among the image's labels"}


def top1_correct(logits, labels):
    """How many images' top-scoring class is their label (labels [B]) or among their labels (multi-hot [B, C])."""
    top = logits.argmax(1)
    if labels.ndim == 2:
        return labels.gather(1, top[:, None]).bool().sum()
    return (top == labels).sum()


@torch.no_grad()
def accuracy(model, source, img_size, ranks, batch_size):
    """Top-1 accuracy of the classifier on a whole ImageSource (eval transform), as ACCURACY defines it, each rank
    counting its batches."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=ranks.device)
    for images, labels, _ in source.batches(batch_size * 2, rank=ranks.rank, world_size=ranks.world_size, whole=True):
        with autocast(ranks.device):
            _, logits, _ = model(MyDataset.eval_transform(images, img_size, IMAGENET_MEAN, IMAGENET_STD))
        correct += top1_correct(logits, labels)
    return all_reduce_sum(correct, ranks).item() / len(source)


def find_resume(model_dir, bits):
    runs = sorted(Path(model_dir).glob(f"{bits}bits_*.resume"), key=lambda p: p.stat().st_mtime_ns)
    return runs[-1] if runs else None


def training_lists(args):
    """(folder, (train entries, label indices), (test entries, label indices), classes): cheap, before any decoding."""
    folder = Path(args.data_root) / "image"
    strict = getattr(args, "strict_paths", False)
    train_entries = MyDataset.read_list(folder / "trainlist.txt", need_label=True, strict_paths=strict)
    test_entries = MyDataset.read_list(folder / "testlist.txt", need_label=True, strict_paths=strict)
    classes = MyDataset.training_classes(train_entries)
    if len(classes) < 2:
        raise UserError(f"{folder / 'trainlist.txt'} has {len(classes)} class; training a classifier needs at least 2")
    # multi-label when either list gives an image two labels or more: label indices [N] become multi-hot [N, C]
    multi = MyDataset.is_multi_label(train_entries, test_entries)
    labelling = MyDataset.multi_hot if multi else MyDataset.class_indices
    train_labels = labelling(train_entries, classes, folder / "trainlist.txt")
    test_labels = labelling(test_entries, classes, folder / "testlist.txt")
    return folder, (train_entries, train_labels), (test_entries, test_labels), classes


def train_sources(args, lists, ranks):
    """The training and test ImageSources of training_lists(args), every header read before either is decoded.

    Under torchrun local rank 0 of each machine builds the decoded cache while the others wait, then they read it.
    """
    with local_main_first(ranks):
        return _train_sources(args, lists, ranks.device)


def _train_sources(args, lists, device):
    folder, (train_entries, train_labels), (test_entries, test_labels), _ = lists
    common = dict(workers=args.workers, skip_bad=args.skip_bad, cache=not args.no_cache, device=device)
    # both lists' headers are read before either is decoded: a bad test image fails in seconds, not after the decode
    train_checked = MyDataset.check_images(folder, train_entries, args.skip_bad)
    test_checked = MyDataset.check_images(folder, test_entries, args.skip_bad)
    train = MyDataset.ImageSource(folder, train_entries, train_labels, args.img_size, "trainlist",
                                  checked=train_checked, **common)
    test = MyDataset.ImageSource(folder, test_entries, test_labels, args.img_size, "testlist",
                                 checked=test_checked, **common)
    return train, test


def report_bad(sources, result_dir):
    """Write result/bad_images.txt and say how many images --skip-bad left out; returns that number."""
    bad = [message for source in sources for _, message in source.bad]
    if bad:
        write_text(Path(result_dir) / "bad_images.txt", "".join(m + "\n" for m in bad))
        print(f"skipped {len(bad)} unreadable image(s), listed in {Path(result_dir) / 'bad_images.txt'}")
    return len(bad)


def resumed_args(args, ranks):
    """(args, state): the interrupted run's arguments and state when --resume, else (args, None).

    Rank 0 reads the .resume file and sends it to every rank, so the model folder need not be shared.
    """
    if not args.resume:
        return args, None
    resume_path, state = from_main(ranks, lambda: read_resume(Path(args.model_dir), args.bits))
    kept = {k: getattr(args, k) for k in ("device", "workers", "debug", "resume", "dist_timeout", "strict_paths")}
    args = argparse.Namespace(**{**state["args"], **kept})
    # state["epoch"] is the 0-based index of the last completed epoch; the log counts from 1
    if ranks.is_main:
        print(f"resuming {resume_path} from epoch {state['epoch'] + 2} of {args.epochs} "
              f"({state['epoch'] + 1} completed)")
    return args, state


def read_resume(model_dir, bits):
    resume_path = find_resume(model_dir, bits)
    if resume_path is None:
        raise UserError(f"nothing to resume: no interrupted {bits}-bit run in {model_dir}/ "
                        f"(start one with: python mytrain.py --bits {bits})")
    state = safe_load(resume_path, "a resume state written by mytrain.py (delete it and start afresh)")
    if not isinstance(state, dict) or not {"args", "epoch", "state_dict", "optimizer"} <= state.keys():
        raise UserError(f"{resume_path} is not a resume state written by mytrain.py; delete it and start afresh")
    return resume_path, state


def train_one_epoch(step_model, optimizer, train, generator, epoch, args, ranks):
    """One pass over train; returns (summed loss, correct count) over every rank's images, on every rank.

    Each rank takes its contiguous piece of every global batch of --batch-size. Its loss is scaled by its share of
    the batch times the world size, so the gradients DDP averages are those of the whole batch: the learning-rate
    schedule and the results are a single process's.
    """
    step_model.train()
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    loss_sum = torch.zeros((), device=ranks.device)
    correct = torch.zeros((), dtype=torch.int64, device=ranks.device)
    bar = MyDataset.tqdm(train.batches(args.batch_size, generator, ranks.rank, ranks.world_size), total=steps_per_epoch,
                         leave=False, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", disable=not ranks.is_main)
    for i, (images, labels, _) in enumerate(bar):
        batch = min(args.batch_size, len(train) - i * args.batch_size)  # this step's global batch
        # BatchNorm cannot train on one image, and every rank must take part in every step (DDP's all-reduce)
        if batch < (1 if args.recipe == "dlbhc" else 2) * ranks.world_size:
            continue
        step = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps_per_epoch, args) * group["lr_scale"]
        start, stop = MyDataset.batch_share(batch, ranks.rank, ranks.world_size)
        x = MyDataset.train_transform(images, args.img_size, IMAGENET_MEAN, IMAGENET_STD, generator, rows=(start, stop, batch))
        with autocast(ranks.device):
            codes, logits, _ = step_model(x)
        loss = hashing_loss(codes.float(), logits.float(), labels, args)
        optimizer.zero_grad(set_to_none=True)
        (loss * ((stop - start) * ranks.world_size / batch)).backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += top1_correct(logits, labels)
        if i % 20 == 19:  # the only host synchronisation in the loop
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return all_reduce_sum(loss_sum, ranks), all_reduce_sum(correct, ranks)


def write_epoch(record, log_path, resume_path, resume_state):
    """The epoch's JSON line on stdout and appended to the log, then the resume state, written atomically."""
    print(to_json(record), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(to_json(record) + "\n")
    atomic_write(resume_path, lambda tmp: torch.save(resume_state, tmp))


def main():
    args = get_args_parser().parse_args()
    ranks = setup_ranks(args.device, args.dist_timeout)
    with distributed_run(ranks):
        train_model(args, ranks)


def train_model(args, ranks):
    """The whole run on this rank; rank 0 alone writes the log, the resume state and the model."""
    args, state = resumed_args(args, ranks)
    check_args(args, ranks)
    if ranks.is_main:
        print_args(args)
    model_dir, device = Path(args.model_dir), ranks.device
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    lists = training_lists(args)
    classes = lists[-1]
    model = AlexNetPlusLatent(args.bits, len(classes), args.recipe, args.dropout)
    if state is None:  # before any decoding: missing weights are known in seconds
        load_pretrained(model, args.pretrained)
    train, test = train_sources(args, lists, ranks)
    bad_count = report_bad((train, test), args.result) if ranks.is_main else 0

    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, train_seconds = 0, 0.0
    run_stem = time.strftime(f"{args.bits}bits_%Y%m%d-%H%M%S")
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_epoch, train_seconds, run_stem = state["epoch"] + 1, state["train_seconds"], state["run_stem"]
    resume_path = model_dir / f"{run_stem}.resume"
    log_path = model_dir / f"{run_stem}.jsonl"
    if ranks.is_main and state is not None and log_path.exists():  # a kill after an epoch's log line, before its state
        kept_lines = [line for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True)
                      if line.endswith("\n") and json.loads(line)["epoch"] <= start_epoch]
        write_text(log_path, "".join(kept_lines))
    step_model = wrap_for_ranks(model, ranks)
    step_model = torch.compile(step_model) if args.compile else step_model

    test_accuracy = None
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        loss_sum, correct = train_one_epoch(step_model, optimizer, train, generator, epoch, args, ranks)
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        broadcast_buffers(model, ranks)
        test_accuracy = accuracy(model, test, args.img_size, ranks, args.batch_size)
        record = {"epoch": epoch + 1, "loss": round(loss_sum.item() / len(train), 5),
                  "train_accuracy": round(correct.item() / len(train), 5), "test_accuracy": round(test_accuracy, 5),
                  "seconds": round(seconds, 2), "images_per_second": round(len(train) / seconds, 1)}
        if ranks.is_main:
            resume_state = {"state_dict": unwrapped_state_dict(model), "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "epoch": epoch, "train_seconds": train_seconds,
                            "run_stem": run_stem, "args": vars(args)}
            write_epoch(record, log_path, resume_path, resume_state)

    if test_accuracy is None:  # resumed a run whose last epoch had completed: measure it again
        test_accuracy = accuracy(model, test, args.img_size, ranks, args.batch_size)
    if not ranks.is_main:
        return
    if sum(len(source.bad) for source in (train, test)) > bad_count:  # streamed images that broke when decoded
        report_bad((train, test), args.result)
    path = model_name(model_dir, args.bits, test_accuracy)
    label_kind = "multi" if train.labels.ndim == 2 else "single"
    save_checkpoint(path, model, bits=args.bits, classes=classes, label_kind=label_kind,
                    accuracy_definition=ACCURACY[label_kind], img_size=args.img_size, mean=list(IMAGENET_MEAN),
                    std=list(IMAGENET_STD), recipe=args.recipe, dropout=args.dropout, pretrained=args.pretrained,
                    epoch=args.epochs, test_accuracy=test_accuracy, train_seconds=round(train_seconds, 2),
                    device=str(device), world_size=ranks.world_size, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    args=vars(args))
    if log_path.exists():
        os.replace(log_path, path.with_suffix(".jsonl"))
    resume_path.unlink(missing_ok=True)
    print(json.dumps({"model": str(path), "test_accuracy": round(test_accuracy, 5),
                      "train_seconds": round(train_seconds, 1)}))


if __name__ == "__main__":
    run_main(main)
