"""How every stage runs: the error contract, the flags every script shares, atomic files and timing.

A user's mistake is one line on stderr and exit status 2; tracebacks are for bugs (and --debug). Files are written
to a temporary name in the same folder and renamed, so a reader sees the old file or the new one, never half.

This module imports no torch, so stages that run no network (prepare_data.py, --help) start in a fraction of a
second. Importing it does nothing.
"""
import argparse
import contextlib
import errno
import hashlib
import json
import os
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
        # a full disk, a read-only or forbidden folder: the user's to fix, and nothing half-written is left behind
        if debug or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        print(f"error: {err.filename or 'a file'}: {err.strerror}; free space, fix permissions "
              "or choose another folder (--out, --model-dir, --result)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def print_args(args):
    """Print the resolved arguments at start; the same dict is stored with what the run writes."""
    print(json.dumps({"args": vars(args)}, default=str), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Files


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary name in the same folder, then rename it onto path.

    A reader sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



def elapsed(since):
    return round(time.perf_counter() - since, 3)
