"""The DLBHC network, its pretrained weights and its checkpoints.

AlexNetPlusLatent (Lin et al., CVPR 2015 workshops): AlexNet's conv layers, fc6 and fc7, then a latent layer of
`bits` sigmoid units and a classifier on top of it. Thresholding the latent sigmoid at 0.5 gives the binary hash
code; fc7 is the feature for coarse-to-fine re-ranking.

This module also holds the training loss, picks the device and autocast for every stage, and saves, loads and finds
checkpoints. A checkpoint (a finished model/*.pt or a run's .resume state) is one dict, written by save_checkpoint:
    format        2
    model_args    bits, classes, img_size, mean, std, recipe, dropout: all that rebuilds the network (build_model)
    model         the state_dict of the unwrapped module
    ...           the run's metadata: args, epoch, test_accuracy, train_seconds, device, time, pretrained; a .resume
                  state adds optimizer, generator and run_stem
Files of format 1 (model/*.pt before model_args existed) load as they are. The error contract, shared flags and
atomic writes live in stage.py.

Importing it does nothing: no download, no file written, no CUDA initialised.
"""
import argparse
import contextlib
import datetime
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from stage import UserError, atomic_write, positive_float

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# dlbhc: the paper's network; bn: a BatchNorm1d before the latent sigmoid; bnconv: that and a BatchNorm2d after
# every conv layer (README, Quality)
RECIPES = ("dlbhc", "bn", "bnconv")
TORCHVISION_CONVS = (0, 3, 6, 8, 10)  # indices of the conv layers in torchvision's alexnet.features
CHECKPOINT_FORMAT = 2
MIN_IMG_SIZE, MAX_IMG_SIZE = 64, 4096  # AlexNet's five strided layers need 64 px; beyond 4096 an image is a bomb
MIN_BITS, MAX_BITS = 8, 4096
# state_dict key prefixes of format 1, before the layers were named for what they are
OLD_LAYER_NAMES = {"remain.": "fc6_fc7.", "Linear1.": "latent.", "Linear2.": "classifier."}


# ---------------------------------------------------------------------------------------------------------------
# Device


def pick_device(name="auto"):
    """The one place that chooses the device: 'auto', 'cpu' or 'cuda'."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda")
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX); elsewhere PyTorch leaves oneDNN out and runs
    bf16 convolutions in its reference kernels, many times slower than fp32 (README, Performance)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:  # not Linux: no way to tell without another dependency
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device, precision="auto"):
    """The one place that decides autocast. auto: bf16 on CUDA; fp32 on the CPU, where bf16 was measured slower on
    a CPU without native bf16 and has not been measured on one with it (README, Performance)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device, precision="auto"):
    """bf16 autocast where uses_bf16(device, precision); full precision otherwise."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Distributed runs: torchrun's conventions (RANK, LOCAL_RANK, WORLD_SIZE in the environment, one process group,
# rank 0 alone writes files). Started without torchrun, the same code runs with world size 1 and no process group.


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: its rank, its local rank (its GPU on its machine), how many, its device."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        """Rank 0: the one process that prints progress and writes files."""
        return self.rank == 0


def distributed_args_parser():
    """--dist-timeout, for the stages that run under torchrun (mytrain.py, database.py), passed as a parent."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dist-timeout", type=positive_float, default=1800,
                        help="under torchrun: seconds a rank waits for the others (a collective, the decoded-cache "
                             "build) before the job ends (default: %(default)s)")
    return parser


def setup_ranks(device_name, timeout_seconds):
    """Read torchrun's environment, pick this rank's device and join the process group once (nccl on CUDA, gloo
    on the CPU). Without torchrun: Ranks(0, 0, 1, pick_device(device_name)) and no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world_size > 1 and device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            "start at most one process per GPU: torchrun --nproc-per-node GPUS")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # the timeout bounds every collective: ranks left behind by a dead one end instead of waiting forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    return Ranks(rank, local_rank, world_size, device)


@contextlib.contextmanager
def distributed_run(ranks):
    """Leave the process group at the end; a rank that loses the others ends with one line and exit status 1.

    torchrun then ends the whole job; `--resume` continues it from the last completed epoch.
    """
    try:
        yield
    except UserError as err:
        if ranks.is_main:
            raise
        raise UserError(f"rank {ranks.rank}: {err}") from err  # each rank says it once; rank 0 as without torchrun
    except (RuntimeError, dist.DistError) as err:
        first_line = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if ranks.world_size == 1 or "--debug" in sys.argv or not _lost_contact(err):
            raise
        print(f"error: rank {ranks.rank} lost contact with the other ranks ({first_line}); another rank stopped or "
              "cannot be reached, so the job ends: continue it with the same command and --resume", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _lost_contact(err):
    """True for the errors a collective raises when a peer died or timed out (gloo and nccl word them so)."""
    words = ("connection", "closed", "reset by peer", "broken pipe", "timed out", "timeout", "nccl", "gloo", "socket")
    return isinstance(err, dist.DistError) or any(word in str(err).lower() for word in words)


def from_main(ranks, read):
    """read() on rank 0, its value on every rank: files only rank 0 needs to have (a model, a resume state).

    A UserError on rank 0 ends every rank: rank 0 prints it, the others leave quietly with the same exit status.
    """
    outcome = None
    if ranks.is_main:
        try:
            outcome = (read(), None)
        except UserError as err:
            outcome = (None, str(err))
    if ranks.world_size > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    value, error = outcome
    if error is not None:
        if ranks.is_main:
            raise UserError(error)
        sys.exit(2)
    return value


def all_reduce_sum(tensor, ranks):
    """Sum a tensor over the ranks in place (nothing to do for one rank); returns it."""
    if ranks.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ranks):
    if ranks.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def local_main_first(ranks):
    """Local rank 0 of each machine runs the block first (builds the decoded cache); the others wait, then read it."""
    if ranks.local_rank != 0:
        barrier(ranks)
    yield
    if ranks.local_rank == 0:
        barrier(ranks)


def gather_to_main(ranks, value):
    """[every rank's value] on rank 0, None on the others."""
    if ranks.world_size == 1:
        return [value]
    gathered = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def wrap_for_ranks(model, ranks):
    """DistributedDataParallel when there are several ranks (SyncBatchNorm on CUDA), the model itself otherwise.

    SyncBatchNorm takes batch statistics over the whole global batch, as a single process does; PyTorch offers it
    on GPUs only, so on the CPU (gloo) each rank's BatchNorm sees its own share of the batch (README).
    """
    if ranks.world_size == 1:
        return model
    if ranks.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ranks.device.index] if ranks.device.index is not None
                                               else None)


def broadcast_buffers(model, ranks):
    """Every rank takes rank 0's BatchNorm running statistics: evaluation on shards uses the model rank 0 saves."""
    if ranks.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------------------------------------------------------
# The network


def alexnet_features(batchnorm):
    """AlexNet's conv stack (torchvision's layout), optionally with a BatchNorm2d after each conv.

    Returns (nn.Sequential, indices of the conv layers in it), so ImageNet weights load into either form.
    """
    layers, conv_indices = [], []
    for cin, cout, kernel, stride, padding, pool in ((3, 64, 11, 4, 2, True), (64, 192, 5, 1, 2, True),
                                                     (192, 384, 3, 1, 1, False), (384, 256, 3, 1, 1, False),
                                                     (256, 256, 3, 1, 1, True)):
        conv_indices.append(len(layers))
        layers.append(nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding))
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    return nn.Sequential(*layers), tuple(conv_indices)


class AlexNetPlusLatent(nn.Module):
    """AlexNet features, fc6, fc7, a latent Linear(4096, bits) + sigmoid, and a Linear(bits, classes) classifier.

    recipe 'dlbhc' is the paper's network; 'bn' adds a BatchNorm1d between the latent Linear and the sigmoid;
    'bnconv' adds that and a BatchNorm2d after every conv, which lets a from-scratch AlexNet train quickly
    (README, Quality). dropout is fc6/fc7's dropout probability.
    """

    def __init__(self, bits, num_classes, recipe="dlbhc", dropout=0.5):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        self.bits, self.num_classes, self.recipe = bits, num_classes, recipe
        self.features, self.conv_indices = alexnet_features(batchnorm=recipe == "bnconv")
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        # fc6 and fc7 with their dropout and ReLU, indices as in torchvision's alexnet.classifier[0:6]
        self.fc6_fc7 = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        )
        self.latent = nn.Linear(4096, bits)  # the hash layer: its sigmoid, thresholded at 0.5, is the code
        self.latent_norm = nn.BatchNorm1d(bits) if recipe in ("bn", "bnconv") else nn.Identity()
        self.classifier = nn.Linear(bits, num_classes)
        self.fc6_on_pixel = True  # fc6_of_one_pixel where it applies; False: the pool always (bench/train.py)
        self.register_load_state_dict_pre_hook(rename_old_layers)

    def forward(self, images):
        """images [B, 3, H, W] normalised, H, W >= 64 -> (codes [B, bits] in (0, 1), logits [B, C], fc7 [B, 4096])."""
        maps = self.features(images)
        if self.fc6_on_pixel and maps.shape[-2:] == (1, 1) and self.training and self.fc6_fc7[0].p == 0:
            fc7 = self.fc6_fc7[2:](self.fc6_of_one_pixel(torch.flatten(maps, 1)))
        else:
            fc7 = self.fc6_fc7(torch.flatten(self.avgpool(maps), 1))
        codes = torch.sigmoid(self.latent_norm(self.latent(fc7)))
        return codes, self.classifier(codes), fc7

    def fc6_of_one_pixel(self, channels):
        """fc6 after the 6 x 6 pool of 1 x 1 maps (inputs under about 100 px, such as the CPU quick mode's 64),
        from the maps' 256 values [B, 256].

        The pool repeats each value 36 times, so fc6 equals a Linear(256, 4096) whose weight per channel is the sum
        of fc6's 36. That is 36x less work for the largest layer, 43% of a CPU training step at 64 px (README,
        Performance). Autograd gives each of the 36 weights the one gradient fc6's own backward gives them all.
        Same function and gradients, summed in another order, so training only: encoding and evaluation keep the
        pool, and a model's codes stay what they were. Not with fc6's dropout, which masks the 36 copies apart.
        """
        fc6 = self.fc6_fc7[1]
        weight = fc6.weight.view(fc6.out_features, channels.shape[1], -1).sum(-1)
        return F.linear(channels, weight, fc6.bias)

    def new_layers(self):
        """Parameters that never come from ImageNet: trained with a higher learning rate when fine-tuning."""
        return [*self.latent.parameters(), *self.latent_norm.parameters(), *self.classifier.parameters()]


def rename_old_layers(module, state_dict, prefix, *_):
    """load_state_dict hook: format 1's Linear1/Linear2/remain keys load into latent/classifier/fc6_fc7."""
    for key in list(state_dict):
        for old, new in OLD_LAYER_NAMES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


def hashing_loss(codes, logits, labels, label_smoothing=0.0, binarize=0.0, balance=0.0):
    """DLBHC's cross-entropy on the classifier, plus SSDH's optional binarisation and bit-balance terms.

    codes [B, bits] in (0, 1) and logits [B, C] as the network returns them (in float32); labels int64 [B], or
    multi-hot [B, C] for multi-label data, which takes sigmoid binary cross-entropy, one term per class.
    """
    if labels.ndim == 2:
        targets = labels.float() * (1 - label_smoothing) + label_smoothing / 2
        loss = F.binary_cross_entropy_with_logits(logits, targets)
    else:
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if binarize:
        loss = loss - binarize * (codes - 0.5).pow(2).mean()  # [B, bits]: larger when outputs sit near 0 or 1
    if balance:
        loss = loss + balance * (codes.mean(0) - 0.5).pow(2).mean()  # each bit on for half the batch
    return loss


def load_pretrained(model, spec):
    """Put ImageNet AlexNet weights into features and fc6/fc7: spec is 'imagenet', 'none' or a state_dict path."""
    if spec == "none":
        return
    if spec == "imagenet":
        import torchvision

        weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, timeouts, a corrupt cache file: all mean "not to be had here"
            raise UserError(
                f"the ImageNet AlexNet weights cannot be had ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                "train from scratch with --pretrained none, or give a local AlexNet state_dict with --pretrained PATH"
            ) from err
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--pretrained {spec}: no such file; use imagenet, none or the path of an AlexNet state_dict")
        state = safe_load(path, "an AlexNet state_dict (save one with torch.save(torchvision.models.alexnet(...)"
                                ".state_dict(), PATH))")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--pretrained {spec}: expected a state_dict (a dict of tensors)")
    # torchvision names fc6/fc7 classifier.1 / classifier.4; here they are fc6_fc7.1 / fc6_fc7.4
    mapped = {}
    conv_position = dict(zip(TORCHVISION_CONVS, model.conv_indices))
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in conv_position:
            mapped[f"features.{conv_position[int(parts[1])]}.{parts[2]}"] = value
        elif key.startswith(("classifier.1.", "classifier.4.")):
            mapped["fc6_fc7." + key[len("classifier."):]] = value
    own = model.state_dict()
    wanted = [f"{layer}.{name}" for layer in [f"features.{i}" for i in model.conv_indices] + ["fc6_fc7.1", "fc6_fc7.4"]
              for name in ("weight", "bias")]
    missing = [k for k in wanted if k not in mapped]
    if missing or any(mapped[k].shape != own[k].shape for k in wanted):
        raise UserError(f"--pretrained {spec}: not an AlexNet state_dict (missing or mismatched: {missing[:3] or 'shapes'})")
    model.load_state_dict(mapped, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one dict of plain values, model_args and the unwrapped state_dict, loadable with weights_only=True


def model_args(bits, classes, img_size, recipe, dropout, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """What rebuilds the network and feeds it: stored in every checkpoint, read by build_model."""
    return {"bits": bits, "classes": list(classes), "img_size": img_size, "mean": list(mean), "std": list(std),
            "recipe": recipe, "dropout": dropout}


def build_model(args, device=None):
    """The network of a checkpoint's model_args, untrained (device "meta": shapes only, no memory)."""
    with torch.device(device or "cpu"):
        return AlexNetPlusLatent(args["bits"], len(args["classes"]), args["recipe"], args["dropout"])


def unwrapped_state_dict(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DataParallel / DDP
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path, model, net_args, **metadata):
    """Write {format, model_args: net_args, model, **metadata} atomically; metadata: plain values and state dicts."""
    checkpoint = {"format": CHECKPOINT_FORMAT, "model_args": net_args, "model": unwrapped_state_dict(model),
                  **metadata}
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def safe_load(path, what, mmap=False):
    """torch.load with weights_only=True: tensors and plain values only, nothing in the file is ever run.

    A pickle that would call anything else (os.system, a class's __reduce__) is refused with one line naming
    what it asked for; any other unreadable file is named too. what says what the file was meant to be. mmap
    leaves the tensors in the file until they are used, so a file's claims can be checked before memory is spent.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore")
            # mmap needs torch.save's zip format; an older or bare pickle is read whole, as its size allows
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL (\S+)", str(err))
        holds = f"asks to call {asked.group(1)}" if asked else "holds pickle instructions beyond tensors and plain values"
        raise UserError(f"{path} was refused unread: it {holds}, which could run code; it is not {what} "
                        "(unpickle only files you trust)") from err
    except Exception as err:
        detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:100]}" if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not {what} ({detail}); it may be truncated or another kind of file") from err


def upgrade_format1(checkpoint):
    """A model file of format 1 (values at the top level, 'state_dict') in today's shape; other dicts unchanged."""
    if checkpoint.get("format", 1) != 1 or "model_args" in checkpoint or not {"bits", "state_dict"} <= checkpoint.keys():
        return checkpoint
    upgraded = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "format")}
    upgraded["model_args"] = {key: upgraded.pop(key, None) for key in ("bits", "classes", "img_size", "mean", "std")}
    # format 1 files from before the recipes existed hold the paper's network with its dropout
    upgraded["model_args"].update(recipe=upgraded.pop("recipe", "dlbhc"), dropout=upgraded.pop("dropout", 0.5))
    return {"format": CHECKPOINT_FORMAT, **upgraded, "model": checkpoint["state_dict"]}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_args_problem(args):
    """What is wrong with a checkpoint's model_args, or None: every field checked before anything is built."""
    if not isinstance(args, dict):
        return "model_args is not a dict"
    bits, classes, img_size = args.get("bits"), args.get("classes"), args.get("img_size")
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        return f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, not {bits!r:.40}"
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of at least 2 strings"
    if not isinstance(img_size, int) or isinstance(img_size, bool) or not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:
        return f"img_size must be an integer from {MIN_IMG_SIZE} to {MAX_IMG_SIZE}, not {img_size!r:.40}"
    for name in ("mean", "std"):
        values = args.get(name)
        if not isinstance(values, list) or len(values) != 3 or not all(is_number(v) for v in values):
            return f"{name} must be 3 finite numbers"
    if any(v <= 0 for v in args["std"]):
        return "std must be positive"
    if args.get("recipe") not in RECIPES:
        return f"recipe must be one of {', '.join(RECIPES)}"
    if not is_number(args.get("dropout")) or not 0 <= args["dropout"] <= 1:
        return "dropout must be a number from 0 to 1"
    return None


def metadata_problem(checkpoint):
    """What is wrong with the run's metadata beside model_args and model, or None (fields a reader may lack are
    absent, never of another type: a resume state's run_stem becomes a file name, its args the run's flags)."""
    checks = {
        "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "test_accuracy": lambda v: is_number(v) and 0 <= v <= 1,
        "train_seconds": lambda v: is_number(v) and v >= 0,
        "args": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        "pretrained": lambda v: isinstance(v, str), "device": lambda v: isinstance(v, str),
        "time": lambda v: isinstance(v, str), "optimizer": lambda v: isinstance(v, dict),
        "generator": lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1,
        "run_stem": lambda v: isinstance(v, str) and re.fullmatch(r"\d+bits_\d{8}-\d{6}", v) is not None,
        "label_kind": lambda v: v in ("single", "multi"), "accuracy_definition": lambda v: isinstance(v, str),
        "world_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    }
    wrong = [key for key, check in checks.items() if key in checkpoint and not check(checkpoint[key])]
    return f"{wrong[0]} holds {type(checkpoint[wrong[0]]).__name__} {checkpoint[wrong[0]]!r:.40}" if wrong else None


def state_dict_problem(args, state):
    """Whether state holds exactly the network's tensors, shapes and dtypes, judged on a shapes-only (meta) network."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "the model state is not a dict of tensors"
    expected = build_model(args, device="meta").state_dict()
    state = dict(state)
    rename_old_layers(None, state, "")
    if state.keys() != expected.keys():
        wrong = sorted(state.keys() ^ expected.keys())
        return f"its tensors are not the network's ({len(wrong)} differ, e.g. {wrong[0]})"
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape or state[key].dtype != tensor.dtype:
            return f"{key} is {state[key].dtype} {tuple(state[key].shape)}, the network's is {tuple(tensor.shape)}"
    return None


def read_checkpoint(path, what="a checkpoint written by mytrain.py"):
    """The checkpoint dict of path in today's shape, every field checked; tensors stay in the file (mmap).

    Nothing in the file is run (weights_only=True), and nothing is allocated for the network before its claims
    (bits, classes, tensor shapes) are found to agree with each other.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; train one with: python mytrain.py --bits BITS")
    checkpoint = safe_load(path, what, mmap=True)
    if isinstance(checkpoint, dict):
        checkpoint = upgrade_format1(checkpoint)
    if isinstance(checkpoint, dict) and "optimizer" in checkpoint and "model_args" not in checkpoint:
        raise UserError(f"{path} is a resume state of an earlier mytrain.py (no model_args): finish that run with the "
                        "mytrain.py that started it, or delete the file and start afresh")
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"{path} is not {what} (no model_args/model)")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not {what} (format {checkpoint.get('format')!r:.20}; this mytrain.py writes "
                        f"format {CHECKPOINT_FORMAT}: a newer version wrote it, update this repository)")
    problem = (model_args_problem(checkpoint["model_args"]) or metadata_problem(checkpoint)
               or state_dict_problem(checkpoint["model_args"], checkpoint["model"]))
    if problem:
        raise UserError(f"{path} is not {what} ({problem})")
    return checkpoint


def read_model_checkpoint(path, bits=None):
    """The checkpoint dict of a model file; refuses a model whose bits differ from `bits`."""
    checkpoint = read_checkpoint(path)
    stored = checkpoint["model_args"]["bits"]
    if bits is not None and stored != bits:
        raise UserError(f"{path} is a {stored}-bit model but --bits {bits} was given; "
                        f"use --bits {stored} or another --model")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """The network a checkpoint holds, in eval mode on the CPU."""
    model = build_model(checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def load_model(path, bits=None):
    """(model in eval mode on the CPU, checkpoint dict); refuses a model whose bits differ from `bits`."""
    checkpoint = read_model_checkpoint(path, bits)
    return model_from_checkpoint(checkpoint), checkpoint


MODEL_NAME = re.compile(r"^(\d+)bits_(\d+\.\d+)(?:_(\d+))?\.pt$")


def model_name(model_dir, bits, accuracy):
    """model/<bits>bits_<test accuracy %>.pt, with _2, _3, ... where the name is taken: runs never overwrite."""
    stem = f"{bits}bits_{100 * accuracy:.2f}"
    path, n = Path(model_dir) / f"{stem}.pt", 1
    while path.exists():
        n += 1
        path = Path(model_dir) / f"{stem}_{n}.pt"
    return path


def newest_model(model_dir, bits):
    """The most recently written finished model for these bits, or a UserError saying how to get one."""
    model_dir = Path(model_dir)
    found = [p for p in model_dir.glob(f"{bits}bits_*.pt") if MODEL_NAME.match(p.name)] if model_dir.is_dir() else []
    if not found:
        raise UserError(f"no {bits}-bit model in {model_dir}/; train one with: python mytrain.py --bits {bits}, "
                        "or name one with --model PATH")
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
