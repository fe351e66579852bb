"""How every stage runs: the error contract, the flags every script shares, atomic files and timing.

A user's mistake is one line on stderr and exit status 2; tracebacks are for bugs (and --debug). Numeric flags are
range-checked by argparse types (positive_int, fraction, ...) before any work. Files are written to a temporary name
in the same folder and renamed, so a reader sees the old file or the new one, never half; a failed write is a
UserError naming the file; what is created gets the user's umask; every JSON written is strict JSON.

This module imports no torch, so stages that run no network (prepare_data.py, --help) start in a fraction of a
second. Importing it does nothing.
"""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


# ---------------------------------------------------------------------------------------------------------------
# Errors and the command-line contract


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, exit status 2."""


def common_args_parser(data_root=True, device=True):
    """Flags the stages share, passed as `parents=[common_args_parser(...)]`; a script asks only for what it reads.

    --debug always; --data-root where the script reads or writes images; --device where it runs the network or ranks.
    """
    parser = argparse.ArgumentParser(add_help=False)
    if data_root:
        parser.add_argument("--data-root", default="data",
                            help="folder holding image/ and query/ (default: %(default)s)")
    if device:
        parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                            help="where to run; auto picks CUDA when present (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def run_main(main):
    """Call main() under the error contract: UserError -> one line, exit 2; Ctrl-C -> exit 130."""
    debug = "--debug" in sys.argv
    # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # SIGINT (Ctrl-C, kill -INT) ends every stage the same way, however it was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        # a full disk, a read-only or forbidden folder, a failed device: the user's to fix, and nothing
        # half-written is left behind (every write goes to a temporary name first)
        if debug:
            raise
        print(f"error: {os_error_line(err.filename, err)}; free space, fix permissions or choose another folder "
              "(--out, --model-dir, --result)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Flag values: checked by argparse (`type=`), so a bad value never reaches torch or numpy


def int_in(low, high=None):
    """An argparse type: an integer from low to high (inclusive; high None for no upper end)."""
    span = f"from {low} to {high}" if high is not None else ("at least 1" if low == 1 else f"at least {low}")

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text}")
        return value

    parse.__name__ = f"integer {span}"
    return parse


def float_in(low=None, high=None, above=None):
    """An argparse type: a finite number from low to high (inclusive), or strictly above `above`."""
    if above is not None:
        span = f"above {above}"
    elif low is not None and high is not None:
        span = f"from {low} to {high}"
    else:
        span = f"at least {low}" if low is not None else ""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above)):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}".rstrip() + f", got {text}")
        return value

    parse.__name__ = f"finite number {span}".rstrip()
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed_int = int_in(0, 2**32 - 1)  # what numpy's and torch's seeding both accept
fraction = float_in(0.0, 1.0)
non_negative_float = float_in(0.0)
positive_float = float_in(above=0.0)
finite_float = float_in()
memory_mb = int_in(1, 1 << 22)  # up to 4 TiB: a larger value is a typo, not a machine
threads_int = int_in(1, 4096)


def print_args(args):
    """Print the resolved arguments at start; the same dict is stored with what the run writes."""
    print(to_json({"args": vars(args)}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Files


def current_umask():
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_user_mode(path, folder=False):
    """mkstemp and mkdtemp create 0600 and 0700; what the user gets is what their umask says, as for any file."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def os_error_line(path, err):
    """'<path>: <cause>': 'no space left on device' where that is the cause.

    err: an OSError with any errno or none (numpy's short write has none), or torch.save's RuntimeError.
    """
    errno_value = getattr(err, "errno", None)
    reason = os.strerror(errno_value) if errno_value else (str(err).strip().splitlines() or [type(err).__name__])[0]
    if errno_value in (errno.ENOSPC, errno.EDQUOT) or (errno_value is None and _disk_is_full(path)):
        reason = "no space left on device"
    return f"{path or 'a file'}: {reason[:120]}"


def write_error(path, err):
    """A UserError for a write of path that failed; the caller has left any previous file as it was."""
    return UserError(f"{os_error_line(path, err)}; could not write it, the previous file (if any) is intact; "
                     "free space, fix permissions or choose another folder (--out, --model-dir, --result)")


def _disk_is_full(path):
    folder = Path(path or ".").parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def is_write_failure(err):
    """torch.save reports a failed write as a RuntimeError from its C++ stream writer, with no errno."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(
        mark in str(err) for mark in ("PytorchStreamWriter", "unexpected pos", "file write failed")))


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary name in the same folder, then rename it onto path.

    A reader sees the old file or the new one, never half of one. A failed write (disk full, a file size limit,
    a failing device) is a UserError naming path, and the previous file stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_user_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_write_failure(err):
            raise write_error(path, err) from err
        raise


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finite_json(obj):
    """obj with every NaN or infinite float replaced by None: JSON has no NaN, and the files must stay JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def to_json(obj, indent=None):
    """Valid JSON text: non-finite numbers become null, anything else unknown becomes its str()."""
    return json.dumps(finite_json(obj), indent=indent, default=str, allow_nan=False)


def write_json(path, obj):
    write_text(path, to_json(obj, indent=1) + "\n")


def refuse_json_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def elapsed(since):
    return round(time.perf_counter() - since, 3)
