"""The CPU expert kernels' machine code for a Sapphire Rapids Xeon, compiled on any x86-64 host
(nothing runs: the kernels are only compiled), and what their hot bodies contain: the AMX
kernels' tile instructions and the decode kernel's VNNI dots, integer divisions, and calls by
target (numba's reference counting, libm), in the whole body and between its first and last
hot instruction (where the loops are laid out). A way to check a kernel edit's code without
the AMX machine: that the AMX chunk loops divide and call nothing, that SiLU calls no `expf`
there, that the decode kernel's row loops touch no reference count.

    python bench/cpu_asm.py [--out DIR]   # one JSON line a kernel; DIR: the .s files too

It re-runs itself with NUMBA_CPU_NAME=sapphirerapids and this host's features plus AMX's, in a
scratch numba cache, with amx.has_amx() forced true; then drives ops.moe_gemm_amx and
ops.moe_gemv on a tiny layer with the kernels replaced by stubs that compile each for the
argument types they get.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
CHILD = "CPU_ASM_CHILD"
HOT = {  # a kernel family's hot instructions
    "amx": r"\t(tdp|tile(load|store|zero))",
    "q8": r"\tvpdpbusd",
}


def reexec(args: list[str]) -> None:
    from llvmlite import binding as llvm

    features = llvm.get_host_cpu_features().flatten() + ",+amx-tile,+amx-int8,+amx-bf16"
    env = dict(os.environ, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="cpu_asm_"), **{CHILD: "1"})  # fmt: skip
    raise SystemExit(subprocess.call([sys.executable, __file__, *args], env=env))


def hot_body(asm: str, hot: str) -> list[str]:
    """The lines of the module's largest function with hot instructions (the parfor body)."""
    bodies = [f for f in re.split(r"\n\t\.type\t", asm) if re.search(hot, f)]
    return max(bodies, key=len).splitlines() if bodies else []


def calls(lines: list[str]) -> collections.Counter:
    """Calls by target: `callq *%reg` after `movabsq $target, %reg` (numba's calling style)."""
    held, out = {}, collections.Counter()
    for line in lines:
        if m := re.match(r"\tmovabsq\t\$([A-Za-z_][\w.]*), (%\w+)", line):
            held[m.group(2)] = m.group(1)
        elif m := re.match(r"\tcallq\t\*(%\w+)", line):
            out[held.get(m.group(1), "?")] += 1
    return out


def summary(name: str, lines: list[str], hot: str) -> dict:
    ops = collections.Counter(
        line.split()[0] for line in lines if line.startswith("\t") and line[1] != "."
    )
    at = [i for i, line in enumerate(lines) if re.match(hot, line)]
    span = lines[at[0] : at[-1] + 1] if at else []  # (the loops' code, roughly)
    divisions = sum(bool(re.match(r"\ti?div", line)) for line in span)
    return {
        "kernel": name,
        "instructions": sum(ops.values()),
        "hot": {k: v for k, v in ops.items() if re.match(hot, "\t" + k)},
        "divisions": sum(v for k, v in ops.items() if re.fullmatch(r"i?div[lq]?", k)),
        "calls": dict(calls(lines)),
        "between_hot": {"lines": len(span), "divisions": divisions, "calls": dict(calls(span))},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, help="write each kernel's assembly there")
    args = p.parse_args()
    if not os.environ.get(CHILD):
        reexec(sys.argv[1:])
    from hetero.cpu_experts import amx

    amx.has_amx = lambda: True  # (compile the tile instructions; nothing runs them)
    amx.enable = lambda: True
    import numba
    import numpy as np
    import torch
    from cpu_moe import draw_routing, random_layer

    from hetero.cpu_experts import kernels_amx, kernels_amx_bf16, kernels_q8, ops
    from hetero.cpu_experts.formats import Format

    now = {}  # the format being compiled

    def stub(module, name, family):
        dispatcher = getattr(module, name)

        def compile_only(*a):
            sig = tuple(numba.typeof(x) for x in a)
            dispatcher.compile(sig)
            library = dispatcher.overloads[sig].library
            asm = library.get_asm_str() + "".join(
                lib.get_asm_str() for lib in getattr(library, "_linking_libraries", ())
            )
            label = f"{now['spec']}.{module.__name__.rpartition('.')[2]}.{name}"
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{label}.s").write_text(asm)
            body = hot_body(asm, HOT[family])
            print(json.dumps(summary(label, body, HOT[family])), flush=True)

        setattr(module, name, compile_only)

    for module in (kernels_amx, kernels_amx_bf16):
        for name in ("gate_up", "down"):
            stub(module, name, "amx")
    stub(kernels_q8, "moe_gemv_q8", "q8")
    gen = torch.Generator().manual_seed(0)
    H, I, E, k, T = 256, 128, 8, 2, 40
    for spec, tiles in (("int8", "int8"), ("int4-g128", "int8"), ("int4-g32", "bf16")):
        now["spec"] = spec
        layer = random_layer(Format.parse(spec), H, I, E)
        ids, w = draw_routing(T, E, k, gen)
        x = torch.randn(T, H, generator=gen).numpy()
        g = ops.group_by_expert(ids.numpy(), E)
        ops.moe_gemm_amx(layer, x, w.float().numpy(), g, np.zeros_like(x), int4_tiles=tiles)
        if spec != "int4-g32":  # (the decode kernel: int4 and int8, one compile each)
            ops.moe_gemv(layer, x, w.float().numpy(), g, np.zeros_like(x), 16, True, 4096)


if __name__ == "__main__":
    main()
