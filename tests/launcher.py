"""A warm interpreter for the tests' script runs.

Every run of a repo script starts a Python that imports torch, torchvision and numpy: 4-9 s on a 2-core machine,
and the suite runs scripts some 170 times. This process imports those modules once, then forks one child per run.
The child becomes `python SCRIPT ARGS` as far as the script can tell: its own argv, working directory, environment,
stdin (/dev/null), stdout and stderr (files the caller reads), `__main__`, exit status and interpreter shutdown
(atexit handlers, flushed streams). Only the already-imported third-party modules and the hash seed are shared.

conftest.run starts one launcher per environment (variables read at start-up, such as PYTHONWARNINGS, OMP_NUM_THREADS
or TQDM_*, take effect then) and keeps fresh interpreters for what a fork cannot reproduce: `-c`, `-m` and a changed
PYTHONPATH (sitecustomize hooks).

Protocol, one line each way per run on the control pipes: a JSON request {argv, cwd, env, stdout, stderr, umask, fsize}, answered
by the child's pid and then by its exit status as subprocess reports it (-N for signal N).
"""
import importlib
import json
import os
import resource
import runpy
import sys

# What the repo's scripts import that costs seconds; each child finds these in sys.modules. torch._dynamo is what
# building any torch optimizer imports. No torch op runs here, so no OpenMP pool exists to be forked; numpy's BLAS
# threads are fork-safe (OpenBLAS re-creates them in the child).
PRELOADED = ("numpy", "PIL.Image", "torch", "torch._dynamo", "torchvision", "tqdm")


def set_limits(umask=None, fsize=None):
    """The run's umask and RLIMIT_FSIZE (bytes), where given: a write past fsize fails with EFBIG, as Python
    ignores SIGXFSZ. Also conftest.run's preexec_fn for a fresh interpreter."""
    if umask is not None:
        os.umask(umask)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def become(request):
    """In the forked child: set up the process as `python argv...` would and run the script; never returns."""
    os.chdir(request["cwd"])
    set_limits(request["umask"], request["fsize"])
    os.environ.clear()
    os.environ.update(request["env"])
    created = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], created),
                            (2, request["stderr"], created)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)  # unwinds the launcher's frames: the interpreter then shuts down as after a script's last line


def serve(control_in, control_out):
    for line in control_in:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            control_in.close()
            os.close(control_out)
            become(request)
        os.write(control_out, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(control_out, f"{os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    for name in PRELOADED:
        importlib.import_module(name)
    with open(int(sys.argv[1])) as requests:
        serve(requests, int(sys.argv[2]))
