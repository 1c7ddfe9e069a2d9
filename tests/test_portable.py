"""The portable CPU loops that run where AVX-512 is missing, forced on this machine with
CHANNELCONV_DISABLE_AVX512=1, and the blocked engines' bfloat16 widened to float32 where the CPU
lacks AVX512_BF16, forced with CHANNELCONV_DISABLE_BF16_DOT=1, and the blocked bfloat16 forward
where AMX would take it, with CHANNELCONV_DISABLE_AMX=1 (in a subprocess: the choices are made once
per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# The blocked engine's bfloat16 forward, widened (CHANNELCONV_DISABLE_BF16_DOT) or in channel pairs
# where AMX would take a stride-1 layer (CHANNELCONV_DISABLE_AMX).
BF16_SCRIPT = """
import sys, torch, channelconv
sys.path.insert(0, {tests!r})
from test_correctness import Case, check_case
for layout in ("contiguous", "channels_last"):
    case = Case(batch=2, in_channels={c}, out_channels=20, size=(9, 11), kernel=(3, 3), stride={stride}, padding=1,
                dilation=(1, 1), groups=1, bias=True, unbatched=False, layout=layout)
    check_case(case, "direct", torch.bfloat16)
forward = channelconv.cost((2, {c}, 9, 11), (20, {c}, 3, 3), {stride}, 1, dtype=torch.bfloat16).plans["direct"].passes[
    "forward"]
assert forward["blocked"] and {check}, forward
print("ok")
"""


def run_with(variables, script, **fields):
    tests = str(Path(__file__).parent)
    env = {**os.environ, **{variable: "1" for variable in variables.split(",")}}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tests).parent), env.get("PYTHONPATH", "")])
    code = script.format(tests=tests, **fields)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_plain_loops_without_avx512():
    run_with("CHANNELCONV_DISABLE_AVX512", SCRIPT)


def test_bfloat16_blocked_forward_without_amx():
    run_with("CHANNELCONV_DISABLE_AMX", BF16_SCRIPT, c=20, stride=(1, 1), check='forward["mac_amx"] == 0')


def test_bfloat16_in_channel_pairs_where_forced():
    # Pairs are the default where they pay (AMD); forced here, so that an Intel CPU covers them too.
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX512_BF16 dot product")
    run_with("CHANNELCONV_BF16_PAIRS,CHANNELCONV_DISABLE_AMX", BF16_SCRIPT, c=7, stride=(2, 1), check='forward["pairs"]')


def test_bfloat16_widened_without_its_dot_product():
    # (AMX off too: it takes strided bfloat16 layers, split into phases)
    run_with("CHANNELCONV_DISABLE_BF16_DOT,CHANNELCONV_DISABLE_AMX", BF16_SCRIPT, c=7, stride=(2, 1),
             check='not forward["pairs"]')
