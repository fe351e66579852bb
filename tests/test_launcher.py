"""The tests' launcher (tests/launcher.py) runs a script as a fresh `python SCRIPT ARGS` would: every suite that
runs the repo's scripts through conftest.run relies on it."""
import json
import sys

import pytest

from conftest import run

PROBE = r'''
import atexit, json, os, resource, sys, warnings
import torch  # as mytrain.py does, which also builds an optimizer (importing torch._dynamo): what these imports set
torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # up (warnings filters among it) is then the same
atexit.register(lambda: print("atexit ran"))
print("progress\r50%\r100%", file=sys.stderr)
facts = {"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "file": __file__, "path0": sys.path[0],
         "variable": os.environ.get("PROBE_VARIABLE"), "warnings": [f[0] for f in warnings.filters],
         "umask": os.umask(0), "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0], "stdin": sys.stdin.read()}
print(json.dumps(facts))
if sys.argv[1] == "raise":
    raise ValueError("the probe failed")
sys.exit(int(sys.argv[1]))
'''


@pytest.mark.parametrize("ending", ["3", "raise"])
def test_a_launched_script_sees_what_a_fresh_python_gives_it(tmp_path, ending):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "work").mkdir()
    options = dict(cwd=tmp_path / "work", check=False, env={"PROBE_VARIABLE": "x y", "PYTHONWARNINGS": "default",
                                                          "TQDM_DISABLE": "1"},
                   umask=0o027, fsize=1 << 20)
    launched, fresh = run(script, ending, "--flag", **options), run(script, ending, "--flag", **options, fresh=True)
    assert launched.args[1:] == fresh.args[1:] and launched.args[0] == sys.executable
    assert (launched.returncode, launched.stdout) == (fresh.returncode, fresh.stdout)
    facts = json.loads(launched.stdout.splitlines()[0])
    assert facts["argv"] == [str(script), ending, "--flag"] and facts["cwd"] == str(tmp_path / "work")
    assert (facts["umask"], facts["fsize"], facts["variable"], facts["stdin"]) == (0o027, 1 << 20, "x y", "")
    assert launched.stdout.endswith("atexit ran\n")
    assert launched.returncode == {"3": 3, "raise": 1}[ending]
    assert launched.stderr.startswith("progress\n50%\n100%\n")  # text mode's universal newlines, as subprocess's
    if ending == "raise":  # the launcher's own frames show above the script's in its traceback
        assert fresh.stderr.splitlines()[-1] == launched.stderr.splitlines()[-1] == "ValueError: the probe failed"
    else:
        assert launched.stderr == fresh.stderr
