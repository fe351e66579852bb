"""Train AlexNetPlusLatent on data/image/trainlist.txt; report accuracy on testlist.txt after every epoch.

    python mytrain.py --bits 48                                      # ImageNet-initialised, as in DLBHC
    python mytrain.py --bits 48 --pretrained none --img-size 64 --device cpu --epochs 14   # the CPU quick mode
    python mytrain.py --bits 48 --resume                             # continue the last interrupted 48-bit run
    python mytrain.py --bits 48 --precision fp32                     # no autocast (default auto: bf16 on CUDA, fp32 on the CPU)
    torchrun --nproc-per-node 8 mytrain.py --bits 48                 # 8 GPUs; --batch-size is the global batch
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT mytrain.py --bits 48

The finished model is saved as model/<bits>bits_<test accuracy %>.pt (e.g. model/48bits_91.37.pt, with _2, _3
where the name is taken), its per-epoch metrics beside it as <same name>.jsonl. While a run is going, its state
after each completed epoch is model/<bits>bits_<start time>.resume: not a .pt, so no stage takes it for a model.
Both are checkpoints of net.py's one shape (net.save_checkpoint). Under torchrun rank 0 alone writes these files
(README, Several GPUs and machines).

With --resume, a flag that differs from the interrupted run either takes effect with a printed line (a larger
--epochs, and the flags of RESUME_MAY_CHANGE: where and how the run goes, not what it trains) or stops the run
with exit status 2 naming it.

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

import MyDataset
from net import (IMAGENET_MEAN, IMAGENET_STD, PRECISIONS, RECIPES, all_reduce_sum, autocast, broadcast_buffers, build_model,
                 distributed_args_parser, distributed_run, from_main, hashing_loss, load_pretrained, local_main_first,
                 model_args, model_name, read_checkpoint, save_checkpoint, setup_ranks, uses_bf16, wrap_for_ranks,
                 cpu_has_native_bf16)
from stage import (UserError, common_args_parser, fraction, int_in, non_negative_float, non_negative_int, positive_float,
                   positive_int, print_args, run_main, seed_int, to_json, write_text)

# flags that say where and how a run goes, not what it trains: a resumed run takes them as given now
RESUME_MAY_CHANGE = ("data_root", "device", "debug", "workers", "model_dir", "result", "skip_bad", "no_cache", "compile",
                     "precision", "dist_timeout", "strict_paths", "no_fused")


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
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the training step's autocast; auto: bf16 on CUDA, fp32 on the CPU (bf16 measured slower "
                             "there, README); evaluation and encoding keep the device's default (default: %(default)s)")
    parser.add_argument("--no-fused", action="store_true",
                        help="update the weights parameter by parameter instead of in torch's fused optimizer kernel "
                             "(the same arithmetic up to the last bits; fused measured faster, README)")
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
    # The fused kernel updates every weight in one pass over memory, where the loop over parameters makes several
    # and allocates temporaries the size of fc6 (38M weights) each step: on the CPU, AdamW's step took 0.07 s fused
    # against 0.55 s, a quarter of the whole training step at batch 128 (README). Elementwise, so deterministic.
    fused = not args.no_fused
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, fused=fused)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def learning_rate(step, steps_per_epoch, args):
    """Linear warm-up for args.warmup epochs, then cosine decay to zero at the last step."""
    total = args.epochs * steps_per_epoch
    warmup = min(int(args.warmup * steps_per_epoch), total - 1)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


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
    """(Top-1 accuracy of the classifier on a whole ImageSource (eval transform) as ACCURACY defines it, each rank
    counting its batches; the images this rank's pass found bad)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=ranks.device)
    batches = source.batches(batch_size * 2, rank=ranks.rank, world_size=ranks.world_size, whole=True)
    for images, labels, _ in batches:
        with autocast(ranks.device):
            _, logits, _ = model(MyDataset.eval_transform(images, img_size, IMAGENET_MEAN, IMAGENET_STD))
        correct += top1_correct(logits, labels)
    return all_reduce_sum(correct, ranks).item() / len(source), batches.bad


def find_resume(model_dir, bits):
    runs = sorted(Path(model_dir).glob(f"{bits}bits_*.resume"), key=lambda p: p.stat().st_mtime_ns)
    return runs[-1] if runs else None


def given_flags(argv=None):
    """{dest: value} of the flags on the command line alone: the parser again, with every default suppressed."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def flag_text(flag, value):
    option = "--" + flag.replace("_", "-")
    return option if isinstance(value, bool) else f"{option} {value}"


def parses_to(flag_type, value):
    """Whether the flag's type, given value as text, accepts it and gives it back."""
    try:
        return flag_type(str(value)) == value
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False


def saved_args_problem(saved):
    """The first flag of a resume state's args whose value this parser would never produce, or None."""
    actions = {action.dest: action for action in get_args_parser()._actions}
    for flag, value in saved.items():
        action = actions.get(flag)
        if action is None or (value is None and action.default is None):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            fits = isinstance(value, bool)
        elif action.type not in (None, str):  # a number, range-checked by the flag's own type
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and parses_to(action.type, value)
        else:
            fits = isinstance(value, str)
        if not fits or (action.choices and value not in action.choices):
            return flag_text(flag, repr(value)[:40])
    return None


def read_resume(model_dir, bits):
    """(path, state) of the newest interrupted run with these bits, every field checked."""
    resume_path = find_resume(model_dir, bits)
    if resume_path is None:
        raise UserError(f"nothing to resume: no interrupted {bits}-bit run in {model_dir}/ "
                        f"(start one with: python mytrain.py --bits {bits})")
    state = read_checkpoint(resume_path, "a resume state written by mytrain.py (delete it and start afresh)")
    problem = None if "args" not in state else saved_args_problem(state["args"])
    if problem or not {"args", "epoch", "optimizer", "generator", "train_seconds", "run_stem"} <= state.keys():
        raise UserError(f"{resume_path} is not a resume state written by mytrain.py ({problem or 'a field is missing'}); "
                        "delete it and start afresh")
    return resume_path, state


def resumed_args(args, ranks):
    """(args, state): with --resume, the interrupted run's args with what the flags given now may change, and its
    state; else (args, None). A flag given now that differs from the run's takes effect with a printed line, or
    stops with exit status 2. Rank 0 reads the .resume file and sends it to every rank.
    """
    if not args.resume:
        return args, None
    resume_path, state = from_main(ranks, lambda: read_resume(Path(args.model_dir), args.bits))
    given = given_flags()
    say = print if ranks.is_main else (lambda *_: None)
    completed = state["epoch"] + 1  # state["epoch"]: 0-based index of the last completed epoch
    saved = {flag: value for flag, value in state["args"].items() if flag in vars(args)}  # flags since removed go
    merged = {**vars(args), **saved, "resume": True}  # flags added since the run began keep their defaults
    for flag, value in sorted(given.items()):
        if flag in ("bits", "resume") or value == saved.get(flag, value):
            continue
        if flag not in RESUME_MAY_CHANGE and flag != "epochs":
            raise UserError(f"{flag_text(flag, value)} differs from the run being resumed ({resume_path} has "
                            f"{flag_text(flag, saved[flag])}); leave it out, or start a new run without --resume")
        if flag == "epochs" and value <= completed:
            raise UserError(f"--epochs {value}: the run being resumed has completed {completed} epoch(s); "
                            "give more, or leave --epochs out")
        say(f"{flag_text(flag, value)} takes effect (the run began with {flag_text(flag, saved.get(flag))})"
              + (": the learning-rate schedule now ends at that epoch" if flag == "epochs" else ""))
        merged[flag] = value
    say(f"resuming {resume_path} from epoch {completed + 1} of {merged['epochs']} ({completed} completed)")
    return argparse.Namespace(**merged), state


def training_lists(args):
    """(folder, (train entries, label indices), (test entries, label indices), classes): cheap, before any decoding."""
    folder = Path(args.data_root) / "image"
    strict = args.strict_paths
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


def report_bad(sources, result_dir, late=()):
    """Write result/bad_images.txt and say how many images --skip-bad left out.

    late: messages of streamed images that broke only when decoded, as the passes reported them.
    """
    bad = [message for source in sources for _, message in source.bad] + list(late)
    if bad:
        write_text(Path(result_dir) / "bad_images.txt", "".join(m + "\n" for m in bad))
        print(f"skipped {len(bad)} unreadable image(s), listed in {Path(result_dir) / 'bad_images.txt'}")


def network_args(args, classes, state):
    """The model_args of this run; a resumed run must find the training classes it began with."""
    net_args = model_args(args.bits, classes, args.img_size, args.recipe, args.dropout)
    if state is not None and state["model_args"]["classes"] != net_args["classes"]:
        raise UserError(f"the classes of {Path(args.data_root) / 'image/trainlist.txt'} differ from those of the run "
                        "being resumed; resume with the data it began with (--data-root), or start a new run")
    return net_args


def restore_run(state, model, optimizer, generator, model_dir, bits, is_main=True):
    """(first epoch to run, training seconds so far, run stem): a new run's, or the resumed run's restored from state."""
    if state is None:
        return 0, 0.0, time.strftime(f"{bits}bits_%Y%m%d-%H%M%S")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    start_epoch = state["epoch"] + 1
    log_path = Path(model_dir) / f"{state['run_stem']}.jsonl"
    if is_main and log_path.exists():  # a kill after an epoch's log line but before its resume state
        kept_lines = [line for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True)
                      if line.endswith("\n") and json.loads(line)["epoch"] <= start_epoch]
        write_text(log_path, "".join(kept_lines))
    return start_epoch, state["train_seconds"], state["run_stem"]


def save_model(model, net_args, args, results, run_stem):
    """model/<bits>bits_<accuracy>.pt with the epochs' log beside it; the run's resume state goes."""
    model_dir = Path(args.model_dir)
    path = model_name(model_dir, args.bits, results["test_accuracy"])
    save_checkpoint(path, model, net_args, pretrained=args.pretrained, epoch=args.epochs, **results,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), args=vars(args))
    log_path = model_dir / f"{run_stem}.jsonl"
    if log_path.exists():
        os.replace(log_path, path.with_suffix(".jsonl"))
    (model_dir / f"{run_stem}.resume").unlink(missing_ok=True)
    print(json.dumps({"model": str(path), "test_accuracy": round(results["test_accuracy"], 5),
                      "train_seconds": round(results["train_seconds"], 1)}))


def train_one_epoch(step_model, optimizer, train, generator, epoch, args, ranks):
    """One pass over train; returns (summed loss, correct count) over every rank's images, on every rank, and the
    images this rank's pass found bad.

    Each rank takes its contiguous piece of every global batch of --batch-size. Its loss is scaled by its share of
    the batch times the world size, so the gradients DDP averages are those of the whole batch: the learning-rate
    schedule and the results are a single process's.
    """
    step_model.train()
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    loss_sum = torch.zeros((), device=ranks.device)
    correct = torch.zeros((), dtype=torch.int64, device=ranks.device)
    batches = train.batches(args.batch_size, generator, ranks.rank, ranks.world_size)
    quiet = {} if ranks.is_main else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    bar = MyDataset.tqdm(batches, total=steps_per_epoch,
                         leave=False, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", **quiet)
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
        with autocast(ranks.device, args.precision):
            codes, logits, _ = step_model(x)
        loss = hashing_loss(codes.float(), logits.float(), labels, args.label_smoothing, args.binarize, args.balance)
        optimizer.zero_grad(set_to_none=True)
        (loss * ((stop - start) * ranks.world_size / batch)).backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += top1_correct(logits, labels)
        if i % 20 == 19:  # the only host synchronisation in the loop
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return all_reduce_sum(loss_sum, ranks), all_reduce_sum(correct, ranks), batches.bad


def write_epoch(record, log_path, resume_path, resume_state):
    """The epoch's JSON line on stdout and appended to the log, then the resume state, written atomically."""
    line = to_json(record)
    print(line, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
    save_checkpoint(resume_path, **resume_state)


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
    net_args = network_args(args, lists[-1], state)
    model = build_model(net_args)
    if state is None:  # before any decoding: missing weights are known in seconds
        load_pretrained(model, args.pretrained)
    train, test = train_sources(args, lists, ranks)
    if ranks.is_main:
        report_bad((train, test), args.result)
    late_bad = {}  # message -> None, in the order found: every pass meets a streamed bad image again

    model = model.to(device)
    bf16 = uses_bf16(device, args.precision)
    # NHWC, the layout the batches come in: cuDNN's and oneDNN's fast convolutions, bf16 and fp32 alike (the CPU's
    # fp32 step measured 1.13x faster than with NCHW weights, README)
    model = model.to(memory_format=torch.channels_last)
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16() and ranks.is_main:
        print("note: --precision bf16 on a CPU without native bf16 (AVX512_BF16/AMX) is emulated and slower than fp32")
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, train_seconds, run_stem = restore_run(state, model, optimizer, generator, model_dir, args.bits,
                                                       ranks.is_main)
    resume_path = model_dir / f"{run_stem}.resume"
    log_path = model_dir / f"{run_stem}.jsonl"
    step_model = wrap_for_ranks(model, ranks)
    step_model = torch.compile(step_model) if args.compile else step_model

    test_accuracy = None
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        loss_sum, correct, train_bad = train_one_epoch(step_model, optimizer, train, generator, epoch, args, ranks)
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        broadcast_buffers(model, ranks)
        test_accuracy, test_bad = accuracy(model, test, args.img_size, ranks, args.batch_size)
        late_bad.update(dict.fromkeys(message for _, message in train_bad + test_bad))
        record = {"epoch": epoch + 1, "loss": round(loss_sum.item() / len(train), 5),
                  "train_accuracy": round(correct.item() / len(train), 5), "test_accuracy": round(test_accuracy, 5),
                  "seconds": round(seconds, 2), "images_per_second": round(len(train) / seconds, 1)}
        if ranks.is_main:
            resume_state = {"model": model, "net_args": net_args, "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "epoch": epoch, "train_seconds": train_seconds,
                            "run_stem": run_stem, "args": vars(args)}
            write_epoch(record, log_path, resume_path, resume_state)

    if test_accuracy is None:  # resumed a run whose last epoch had completed: measure it again
        test_accuracy, test_bad = accuracy(model, test, args.img_size, ranks, args.batch_size)
        late_bad.update(dict.fromkeys(message for _, message in test_bad))
    if not ranks.is_main:
        return
    if late_bad:
        report_bad((train, test), args.result, late_bad)
    label_kind = "multi" if train.labels.ndim == 2 else "single"
    save_model(model, net_args, args, {"test_accuracy": test_accuracy, "train_seconds": round(train_seconds, 2),
                                       "device": str(device), "world_size": ranks.world_size, "label_kind": label_kind,
                                       "accuracy_definition": ACCURACY[label_kind]}, run_stem)


if __name__ == "__main__":
    run_main(main)
