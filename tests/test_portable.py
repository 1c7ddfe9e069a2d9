"""The portable CPU loops that run where AVX-512 is missing, forced on this machine with
CHANNELCONV_DISABLE_AVX512=1 (in a subprocess: the choice is made once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_correctness import Case, check_case
# Wide channel counts: on an AVX-512 CPU these take the blocked kernels; here the plain loops.
for stride, kernel in (((1, 1), (3, 3)), ((2, 1), (2, 5)), ((1, 1), (1, 1))):
    case = Case(batch=2, in_channels=20, out_channels=36, size=(9, 11), kernel=kernel, stride=stride, padding=1,
                dilation=(1, 2), groups=2, bias=True, unbatched=False, layout="contiguous")
    check_case(case, "direct", torch.float32)
print("ok")
"""


def test_plain_loops_without_avx512():
    tests = str(Path(__file__).parent)
    env = {**os.environ, "CHANNELCONV_DISABLE_AVX512": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tests).parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
