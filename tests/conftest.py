"""Small generated image sets in the repo's data layout, a runner for the real command lines, and the one trained
model (with its database) that the whole session shares.

`run` runs a script in a child forked from a warm interpreter that has already imported torch (tests/launcher.py,
checked against a fresh `python` by test_launcher.py): importing torch takes 4-9 s on a 2-core machine, and the suite
runs scripts some 170 times. DLBHC_TEST_FRESH_PYTHON=1 starts a fresh interpreter for every run instead.

Tests that need a trained model copy the session's (`trained`, made once per run and shared by the pytest-xdist
workers) instead of training their own; a test that damages a file damages its copy (`copy_trained`).
"""
import contextlib
import fcntl
import functools
import json
import locale
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher import set_limits

REPO = Path(__file__).resolve().parents[1]

# tests/run.sh runs three pytest-xdist workers on the machine's two cores: one intra-op thread for each test's
# processes (and for torch in the workers themselves, imported after this) keeps them from oversubscribing the
# cores. Measured on 2 cores with two workers: 15% less time for the retrieval tests. Results that tests compare
# are made under the one setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def class_image(label, rng, size=32):
    """A size x size RGB image whose class shows in its colour and stripe direction, with noise on top."""
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.pi * label / 4
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8 + rng.uniform(0, 6.3))
    colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 40) % 256], dtype=np.float64)
    image = 0.5 * colour + 0.5 * 255 * (stripes[..., None] > 0) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_dataset(root, classes=3, train_per_class=24, test_per_class=6, query_per_class=4, seed=0, size=32):
    """data/image with trainlist, testlist, list.txt (= train split) and data/query with labelled list.txt."""
    rng = np.random.default_rng(seed)
    image_dir, query_dir = Path(root) / "image", Path(root) / "query"
    lists = {"trainlist": [], "testlist": [], "query": []}
    for label in range(classes):
        for split, count, folder in (("trainlist", train_per_class, image_dir), ("testlist", test_per_class, image_dir),
                                     ("query", query_per_class, query_dir)):
            for i in range(count):
                name = f"{split}/c{label}_{i}.png"
                (folder / split).mkdir(parents=True, exist_ok=True)
                class_image(label, rng, size).save(folder / name)
                lists[split].append(f"{name} {label}\n")
    (image_dir / "trainlist.txt").write_text("".join(lists["trainlist"]))
    (image_dir / "testlist.txt").write_text("".join(lists["testlist"]))
    (image_dir / "list.txt").write_text("".join(lists["trainlist"]))
    (query_dir / "list.txt").write_text("".join(lists["query"]))
    return Path(root)


# Variables that a Python reads as it starts or imports torch, numpy or tqdm: a launcher serves one set of values.
STARTUP_VARIABLES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA", "TQDM_", "LD_",
                     "LC_", "LANG", "MALLOC")
FRESH_PYTHON = os.environ.get("DLBHC_TEST_FRESH_PYTHON") == "1"
launchers, launchers_lock = {}, threading.Lock()


class Launcher:
    """Client of one tests/launcher.py process: run(argv, ...) is subprocess.run(capture_output=True, text=True)
    for a script, in a child forked from an interpreter that has already imported torch."""

    def __init__(self, env):
        requests_read, self.requests = os.pipe()
        self.answers, answers_write = os.pipe()
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests/launcher.py"), str(requests_read),
                                         str(answers_write)], pass_fds=(requests_read, answers_write), env=env,
                                        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(requests_read)
        os.close(answers_write)
        self.buffer, self.lock = b"", threading.Lock()

    def answer(self, deadline):
        while b"\n" not in self.buffer:
            if not select.select([self.answers], [], [], max(0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.answers, 64)
            if not chunk:
                raise RuntimeError(f"the tests' launcher exited with status {self.process.wait()}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return int(line)

    def run(self, argv, cwd, env, timeout, umask=None, fsize=None):
        with self.lock, tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
                       "umask": umask, "fsize": fsize}
            os.write(self.requests, (json.dumps(request) + "\n").encode())
            deadline = time.monotonic() + timeout
            pid = self.answer(deadline)
            status = self.answer(deadline)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                self.answer(time.monotonic() + 60)
            # as subprocess does with text=True: the locale's encoding, universal newlines
            stdout, stderr = (path.read_bytes().decode(locale.getpreferredencoding(False)).replace("\r\n", "\n")
                              .replace("\r", "\n") for path in (out, err))
        if status is None:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess([sys.executable, *argv], status, stdout, stderr)


def launcher_for(env):
    """The launcher for env's start-up variables, started on first use; None where a fresh Python is needed."""
    if FRESH_PYTHON or env.get("PYTHONPATH") != os.environ.get("PYTHONPATH"):  # sitecustomize hooks run at start
        return None
    key = tuple(sorted((name, value) for name, value in env.items() if name.startswith(STARTUP_VARIABLES)))
    with launchers_lock:
        if key not in launchers:
            launchers[key] = Launcher(env)
        return launchers[key]


def run(*args, cwd=None, check=True, env=None, umask=None, fsize=None, timeout=900, fresh=False):
    """Run a repo script as a user would: python SCRIPT ARGS; returns the CompletedProcess. A script runs in a child
    of a launcher (tests/launcher.py), which differs from a fresh `python` only in having imported torch already;
    fresh=True, -c and -m, and a changed PYTHONPATH get a fresh interpreter. umask and fsize (RLIMIT_FSIZE, bytes)
    apply to the script's process."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    args = [str(arg) for arg in args]
    launcher = None if fresh or args[0].startswith("-") else launcher_for(full_env)
    if launcher is not None:
        result = launcher.run(args, cwd or REPO, full_env, timeout, umask, fsize)
    else:
        limits = None if umask is None and fsize is None else functools.partial(set_limits, umask, fsize)
        result = subprocess.run([sys.executable, *args], cwd=cwd or REPO, capture_output=True, text=True,
                                env=full_env, timeout=timeout, preexec_fn=limits)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


TRAINED_BITS = 16
TRAIN_FLAGS = ("--pretrained", "none", "--img-size", 64, "--batch-size", 16, "--device", "cpu", "--workers", 0,
               "--seed", 0)


def train_and_encode(root):
    make_dataset(root / "data", classes=3, train_per_class=32, test_per_class=10, query_per_class=5)
    run(REPO / "mytrain.py", "--bits", TRAINED_BITS, "--epochs", 6, *TRAIN_FLAGS, cwd=root)
    run(REPO / "database.py", "--bits", TRAINED_BITS, "--device", "cpu", "--workers", 0, cwd=root)
    return root


def train_and_mark(root):
    """train_and_encode into a fresh root, marked done only once it is whole."""
    shutil.rmtree(root, ignore_errors=True)  # a run that failed half-way leaves nothing to trust
    train_and_encode(root)
    (root / "done").touch()


def train_shared(shared):
    """Make shared/trained once, under shared/trained.lock: whoever comes first trains, the rest wait and reuse."""
    with open(shared / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = shared / "trained"
        if not (root / "done").exists():
            train_and_mark(root)
    return root


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Under pytest-xdist, the controller (idle while its workers run tests) trains the shared model in the
    background from the start, so that no worker sits waiting for it when its first test asks. Only for a run of
    the whole suite: a selection (-k, -m, some files) may not need the model at all."""
    config = session.config
    if (hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)
            or config.option.collectonly or config.option.keyword or config.option.markexpr
            or [(config.invocation_params.dir / arg).resolve() for arg in config.args] != [REPO / "tests"]):
        return
    shared = config._tmp_path_factory.getbasetemp()  # the workers' basetemps are its subfolders
    lock = open(shared / "trained.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # taken before any worker starts: they wait for this run

    def background():
        with lock, contextlib.suppress(Exception):  # failed: the first worker to ask trains it again, and reports
            train_and_mark(shared / "trained")

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    config.add_cleanup(thread.join)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A root with data/ (3 generated classes: 96 training, 30 test, 15 query images), model/16bits_*.pt trained
    for 6 epochs at 64 px on the CPU, and database/ encoded with it. Read-only: copy_trained gives a copy.

    Under pytest-xdist the workers share one, in the session's own temporary folder (the parent of every worker's
    basetemp): in a run of the whole suite the controller starts training it when the session starts
    (pytest_sessionstart); otherwise the first worker to ask trains it. Either way the others wait on a lock.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return train_and_encode(tmp_path_factory.mktemp("trained"))
    return train_shared(tmp_path_factory.getbasetemp().parent)


def copy_of_trained(trained, root):
    """root with a copy of the trained root's data, model and database (without the decoded cache); returns root."""
    for folder in ("data", "model", "database"):
        shutil.copytree(trained / folder, root / folder, ignore=shutil.ignore_patterns(".cache"))
    return root


@pytest.fixture
def copy_trained(tmp_path, trained):
    """A copy of the session's trained root (data, model, database) that the test may change."""
    return copy_of_trained(trained, tmp_path)
