"""The AMX kernels' machine code for a Sapphire Rapids Xeon, compiled on any x86-64 host (nothing
runs: the kernels are only compiled), and what their hot bodies contain: tile instructions,
integer divisions, and calls by target (numba's reference counting, libm), in the whole body
and between its first and last tile instruction (where the chunk loops are laid out). A way to
check a kernel edit's code without the AMX machine: e.g. that the chunk loop divides nothing and
calls nothing, and SiLU calls no `expf`.

    python bench/amx_asm.py [--out DIR]   # one JSON line a kernel; DIR: the .s files too

It re-runs itself with NUMBA_CPU_NAME=sapphirerapids and this host's features plus AMX's, in a
scratch numba cache, with amx.has_amx() forced true; then drives ops.moe_gemm_amx on a tiny
layer with the kernels replaced by stubs that compile each for the argument types they get.
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
CHILD = "AMX_ASM_CHILD"


def reexec(args: list[str]) -> None:
    from llvmlite import binding as llvm

    features = llvm.get_host_cpu_features().flatten() + ",+amx-tile,+amx-int8,+amx-bf16"
    env = dict(os.environ, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="amx_asm_"), **{CHILD: "1"})  # fmt: skip
    raise SystemExit(subprocess.call([sys.executable, __file__, *args], env=env))


def hot_body(asm: str) -> str:
    """The function of the module that holds the tile instructions (the parfor body)."""
    bodies = [f for f in re.split(r"\n\t\.type\t", asm) if re.search(r"\ttdpb|\ttileloadd", f)]
    return max(bodies, key=len) if bodies else ""


def summary(name: str, body: str) -> dict:
    ops = collections.Counter(
        line.split()[0] for line in body.splitlines() if line.startswith("\t") and line[1] != "."
    )
    targets = collections.Counter(re.findall(r"movabsq\t\$([A-Za-z_][\w.]*), %r", body))
    lines = body.splitlines()
    tile = [i for i, line in enumerate(lines) if re.match(r"\t(tdp|tile(load|store|zero))", line)]
    span = lines[tile[0] : tile[-1] + 1] if tile else []  # (the loops' code, roughly)
    return {
        "kernel": name,
        "instructions": sum(ops.values()),
        "tile": {k: v for k, v in ops.items() if k.startswith(("tdp", "tile"))},
        "divisions": sum(v for k, v in ops.items() if "div" in k and not k.startswith("v")),
        "calls": ops["callq"],
        "call_targets": dict(targets),
        "between_tile_ops": {
            "lines": len(span),
            "divisions": sum(bool(re.match(r"\ti?div", line)) for line in span),
            "calls": sum(line.startswith("\tcallq") for line in span),
        },
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

    from hetero.cpu_experts import kernels_amx, kernels_amx_bf16, ops
    from hetero.cpu_experts.formats import Format

    now = {}  # the format being compiled

    def stub(module, name):
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
            if name in ("gate_up", "down"):
                print(json.dumps(summary(label, hot_body(asm))), flush=True)

        return compile_only

    for module in (kernels_amx, kernels_amx_bf16):
        for name in ("gate_up", "down"):
            setattr(module, name, stub(module, name))
    gen = torch.Generator().manual_seed(0)
    H, I, E, k, T = 256, 128, 8, 2, 40
    for spec, tiles in (("int8", "int8"), ("int4-g128", "int8"), ("int4-g32", "bf16")):
        now["spec"] = spec
        layer = random_layer(Format.parse(spec), H, I, E)
        ids, w = draw_routing(T, E, k, gen)
        x = torch.randn(T, H, generator=gen).numpy()
        out = np.zeros_like(x)
        g = ops.group_by_expert(ids.numpy(), E)
        ops.moe_gemm_amx(layer, x, w.float().numpy(), g, out, {}, 4096, None, tiles)


if __name__ == "__main__":
    main()
