"""Checks the compiled CUDA kernels without a GPU: their resources and what their SASS holds.

    python scripts/check_cuda_kernels.py --binary 'build/cuda-tree/channelconv/_C*.so'

From what ptxas recorded in the binary (cuobjdump -res-usage; the CI build also passes
-Xptxas -v, CHANNELCONV_PTXAS_INFO=1, so its log shows the same per kernel), every architecture:
  * no kernel of ours spills registers (no stack frame, no local memory), except the
    64-bit-index instantiations (index_t = int64_t, for tensors past 2^31 elements), whose
    64-bit divisions are calls into a runtime routine that saves registers across them, and the
    few in KNOWN_SPILLS, each with its reason and a byte limit;
  * each kernel in REGISTER_CEILING stays under its register count (more would cost occupancy:
    the implicit GEMM's 256-thread block must fit twice in an SM's 64K registers).
From the SASS (cuobjdump -sass), for each kernel in MAIN_LOOP, on every sm_80+ architecture:
  * its main loop (the backward branch whose body holds the most FFMA, or HMMA for the TF32
    tensor-core kernels) copies global to shared asynchronously (LDGSTS) with one wait (DEPBAR)
    and one barrier per stage; the float32 kernels' is mostly FFMA (at least MIN_FFMA_FRACTION of
    its instructions) and reads shared memory mostly with 128-bit loads (LDS.128); the TF32
    kernels' holds its 16 mma.sync (HMMA) per stage and no FFMA.
Prints a table and exits non-zero when a check fails. cuobjdump comes from $CUDA_HOME/bin, PATH,
or the copy the CUDA build of torch ships (triton's).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "implicit_gemm.h")

# Kernel name fragment -> the most registers ptxas may use. The implicit GEMM's depends on its
# block: igemm_register_ceiling in csrc/cuda/implicit_gemm.h, read from there (two 256-thread
# blocks or three 128-thread blocks per SM).
REGISTER_CEILING = {
    "igemm_kernel": None,          # by block size, igemm_ceiling()
    "splitk_reduce_kernel": 64,
}


def igemm_ceiling_rule() -> tuple[int, int, int]:
    """(threads, ceiling at or above that many threads, ceiling below) from igemm_register_ceiling."""
    with open(HEADER) as f:
        m = re.search(r"igemm_register_ceiling\(\) \{ return Cfg::kThreads >= (\d+) \? (\d+) : (\d+); \}", f.read())
    if not m:
        raise SystemExit(f"igemm_register_ceiling not found in {HEADER} (its form changed: update this script)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def igemm_ceiling(name: str) -> int:
    m = re.search(r"IgemmConfigILi(\d+)ELi(\d+)", name)
    threads = (int(m.group(1)) // 8) * (int(m.group(2)) // 8)
    at_least, large, small = igemm_ceiling_rule()
    return large if threads >= at_least else small


# Spills accepted, at most this many bytes, in kernels whose mangled name matches (and why).
KNOWN_SPILLS = [
    # sm_90's ptxas keeps one register of the half-precision tiled forward in local memory
    # outside its reduction loop (one STL before it, one LDL after); the tensor-core path is
    # to replace that kernel for float16 / bfloat16.
    (re.compile(r"direct_forward_kernel.*N3c10(4Half|8BFloat16)EiEEv"), 8),
    # sm_90's ptxas holds the col2im gather to 32 registers and stores three of them once before
    # its grid-stride loop, loading them once after it (two STL, two LDL per thread, none inside).
    (re.compile(r"col2im_kernel"), 16),
]
# A kernel template whose last argument is index_t = int64_t (Itanium mangling: 'l' then the
# end of the template arguments and the void return type).
INT64_INDEX = re.compile(r"lEEvP")
MAIN_LOOP = ("igemm_kernel",)
MIN_FFMA_FRACTION = 0.6
TF32_MMA_PER_STAGE = 16


def find_cuobjdump() -> str:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    if shutil.which("cuobjdump"):
        candidates.append(shutil.which("cuobjdump"))
    try:
        import triton  # noqa: F401  (the CUDA build of torch depends on it and ships cuobjdump)
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("no cuobjdump found (set CUDA_HOME, or install the CUDA build of torch)")


def resource_entries(dump: str):
    """(kernel, arch, registers, stack_bytes, local_bytes) per function of ours in a -res-usage dump."""
    entries = []
    arch = None
    lines = dump.splitlines()
    for i, line in enumerate(lines):
        a = re.match(r"\s*arch = (sm_\d+)", line)
        if a:
            arch = a.group(1)
        f = re.match(r"\s*Function (\S+):", line)
        if f and "channelconv" in f.group(1) and i + 1 < len(lines):
            r = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", lines[i + 1])
            if r:
                entries.append((f.group(1), arch, int(r.group(1)), int(r.group(2)), int(r.group(3))))
    return entries


def sass_functions(sass: str):
    """(arch, function name, [(address, opcode)]) for every function in a cuobjdump -sass dump."""
    arch = None
    out = []
    for block in re.split(r"\n(?=\s*(?:arch = |Function : ))", sass):
        a = re.match(r"\s*arch = (sm_\d+)", block)
        if a:
            arch = a.group(1)
            continue
        f = re.match(r"\s*Function : (\S+)", block)
        if not f:
            continue
        ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(
            r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", block)]
        out.append((arch, f.group(1), ins))
    return out


def main_loop(ins, math: str):
    """The instructions of the backward branch whose body holds the most `math` (FFMA, HMMA)."""
    best = []
    for addr, op, args in ins:
        if not op.startswith("BRA"):
            continue
        t = re.search(r"0x([0-9a-f]+)", args)
        if not t or int(t.group(1), 16) >= addr:
            continue
        body = [o for a, o, _ in ins if int(t.group(1), 16) <= a <= addr]
        if sum(o.startswith(math) for o in body) > sum(o.startswith(math) for o in best):
            best = body
    return best


def demangled_fragment(name: str, fragments) -> str | None:
    return next((f for f in fragments if f in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True, help="the built extension (a glob is expanded)")
    options = parser.parse_args()
    failures = []
    binaries = glob.glob(options.binary)
    if len(binaries) != 1:
        raise SystemExit(f"--binary {options.binary!r} matches {binaries}")
    cuobjdump = find_cuobjdump()

    def dump(flag: str) -> str:
        return subprocess.run([cuobjdump, flag, binaries[0]], check=True, capture_output=True, text=True).stdout

    entries = resource_entries(dump("-res-usage"))
    if not entries:
        failures.append(f"no kernels of ours in {binaries[0]}")
    print(f"{'kernel':70} {'arch':6} {'regs':>4} {'stack':>5} {'local':>5}")
    for name, arch, regs, stack, local in entries:
        short = re.sub(r"_GLOBAL__N__\w+?_\d+", "", name)[:70]
        print(f"{short:70} {arch!s:6} {regs:>4} {stack:>5} {local:>5}")
        allowed = max([limit for pattern, limit in KNOWN_SPILLS if pattern.search(name)], default=0)
        if (stack > allowed or local > allowed) and not INT64_INDEX.search(name):
            failures.append(f"{name} ({arch}): {stack} bytes of stack, {local} of local memory (spills)")
        frag = demangled_fragment(name, REGISTER_CEILING)
        ceiling = (REGISTER_CEILING[frag] or igemm_ceiling(name)) if frag else None
        if ceiling is not None and regs > ceiling:
            failures.append(f"{name} ({arch}): {regs} registers, ceiling {ceiling}")
    for f in sorted(f for f in REGISTER_CEILING if not any(f in e[0] for e in entries)):
        failures.append(f"no kernel {f} in {binaries[0]}")

    sass = dump("-sass")
    checked = 0
    print(f"\n{'main loop':40} {'arch':6} {'instr':>5} {'FFMA':>5} {'frac':>5} {'LDS.128':>7} {'LDS':>4} "
          f"{'LDGSTS':>6} {'DEPBAR':>6} {'BAR':>4} {'HMMA':>5}")
    for arch, name, ins in sass_functions(sass):
        frag = demangled_fragment(name, MAIN_LOOP)
        if not frag or arch is None or int(arch[3:]) < 80:
            continue
        checked += 1
        tensor_cores = "Tf32Math" in name
        body = main_loop(ins, "HMMA" if tensor_cores else "FFMA")
        count = collections.Counter(body)
        ffma = sum(v for k, v in count.items() if k.startswith("FFMA"))
        hmma = sum(v for k, v in count.items() if k.startswith("HMMA"))
        lds128 = count["LDS.128"]
        lds_narrow = sum(v for k, v in count.items() if k.startswith("LDS") and k != "LDS.128")
        ldgsts = sum(v for k, v in count.items() if k.startswith("LDGSTS"))
        depbar = sum(v for k, v in count.items() if k.startswith("DEPBAR"))
        bars = sum(v for k, v in count.items() if k.startswith("BAR.SYNC"))
        frac = ffma / len(body) if body else 0.0
        config = re.search(r"IgemmConfigILi(\d+)ELi(\d+)", name)
        problem = "wgrad" if "WeightGradProblem" in name else "corr"  # forward, input gradient
        label = f"{frag}<{problem}{' tf32' if tensor_cores else ''} {config.group(1)}x{config.group(2)}>" if config else frag
        print(f"{label:40} {arch:6} {len(body):5} {ffma:5} {frac:5.2f} {lds128:7} {lds_narrow:4} {ldgsts:6} "
              f"{depbar:6} {bars:4} {hmma:5}")
        where = f"{label} ({arch})"
        if tensor_cores:
            # mma.sync m16n8k8: a thread's 64 accumulators are 16 tiles of 4, one HMMA each per
            # k-step of 8; fragments come by 32-bit shared loads (the PTX layout), no FFMA.
            if hmma < TF32_MMA_PER_STAGE or ffma:
                failures.append(f"{where}: main loop has {hmma} HMMA (want >= {TF32_MMA_PER_STAGE}) and {ffma} FFMA")
        else:
            if frac < MIN_FFMA_FRACTION:
                failures.append(f"{where}: main loop {frac:.2f} FFMA, want >= {MIN_FFMA_FRACTION}")
            if lds128 == 0 or lds_narrow > lds128 // 4:
                failures.append(f"{where}: main loop reads shared memory with {lds128} LDS.128 and {lds_narrow} narrower")
        if ldgsts == 0 or depbar != 1 or bars != 1:
            failures.append(f"{where}: {ldgsts} LDGSTS, {depbar} DEPBAR, {bars} BAR.SYNC in the main loop")
    if checked == 0:
        failures.append(f"no sm_80+ SASS for {MAIN_LOOP} in {binaries[0]}")

    for f in failures:
        print("FAIL", f)
    print(f"{len(entries)} kernels, {checked} main loops checked, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
