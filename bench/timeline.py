"""The CPU engine's timeline (EngineStats.trace) as a Chrome/Perfetto trace and as numbers, and
bench/decode.py's per-step trace and torch.profiler tables.

Events are (name, thread id, start ns, end ns): "submit" and "wait" on the caller's thread,
"input" (the worker waiting for a job's inputs to reach pinned memory) and "L<layer>" (a part
computed) on the worker. Open the JSON in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.workloads import decode_batch, set_mode, time_steps
from hetero.model.batch import PagedKVCache
from hetero.sched.graphs import GraphedDecoder


def write_chrome_trace(events: list[tuple], path: str | Path, names: dict[int, str]) -> None:
    """`names`: thread id -> a label (threads not named keep their id)."""
    t0 = min(e[2] for e in events)
    out = [
        {"name": name, "ph": "X", "pid": 0, "tid": names.get(tid, str(tid)),
         "ts": (start - t0) / 1e3, "dur": (end - start) / 1e3}
        for name, tid, start, end in events
    ]  # fmt: skip
    Path(path).write_text(json.dumps({"traceEvents": out}))


def summarize(events: list[tuple], steps: int) -> dict:
    """Per step, in ms: the worker's compute, its idle time between computes (waiting for work
    or for inputs), the inputs' wait, and the caller's waits."""
    computes = sorted((s, e) for name, _, s, e in events if name.startswith("L"))
    idle = sum(max(0, b[0] - a[1]) for a, b in zip(computes, computes[1:]))

    def total(pick) -> float:
        return sum(e - s for name, _, s, e in events if pick(name))

    per_step = {
        "compute": total(lambda n: n.startswith("L")),
        "worker_idle": idle,
        "input_wait": total(lambda n: n == "input"),
        "caller_wait": total(lambda n: n == "wait"),
        "submit": total(lambda n: n == "submit"),
    }
    return {f"{k}_ms": round(v / 1e6 / steps, 3) for k, v in per_step.items()}


def trace_steps(model, config, engine, cache, B, pos, device, graphed, args) -> dict:
    """The engine's timeline over `args.steps` steps of the deepest deferral mode, written to
    `args.trace` (with the batch size in the name) and summarized per step."""
    import threading

    mode = f"defer{max(args.defer)}" if args.defer else "overlap"
    set_mode(model, config, engine, mode)
    engine.stats.trace = []
    time_steps(model, engine, cache, B, pos, args.steps, device, graphed)
    events, engine.stats.trace = engine.stats.trace, None
    worker = {t.ident: t.name for t in threading.enumerate()}
    path = Path(args.trace).with_suffix(f".b{B}.json")
    write_chrome_trace(events, path, {**worker, threading.get_ident(): "caller"})
    return {"traced_mode": mode, "trace_file": str(path), **summarize(events, args.steps)}


def profile_step(model, config, engine, cache, B, pos, device, out_dir, modes) -> None:
    """torch.profiler tables (CPU and CUDA time by op) of one step in each mode (eager)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for i, mode in enumerate(modes):
        set_mode(model, config, engine, mode)
        with profile(activities=activities) as prof:
            time_steps(model, engine, cache, B, pos + i, 1, device)
        by = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=by, row_limit=60)
        (Path(out_dir) / f"profile_b{B}_pos{pos}_{mode}.txt").write_text(table)


def kernel_gaps(kernels: list[tuple[str, float, float]]) -> dict:
    """GPU kernels (name, start us, end us) of one stretch -> its span, the time some kernel ran
    (their union), the idle time between them by the kernel that follows, and time and calls
    by kernel."""
    kernels = sorted(kernels, key=lambda k: k[1])
    busy, idle, end = 0.0, {}, kernels[0][1]
    by_name: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, s, e in kernels:
        short = name.split("(")[0].split("<")[0][:48]
        by_name[short] = by_name.get(short, 0.0) + (e - s)
        count[short] = count.get(short, 0) + 1
        if s > end:
            idle[short] = idle.get(short, 0.0) + (s - end)
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    span = end - kernels[0][1]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:16]
    waits = sorted(idle.items(), key=lambda kv: -kv[1])[:10]
    return {
        "span_ms": round(span / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((span - busy) / 1e3, 3),
        "kernels": len(kernels),
        "idle_before_ms": {k: round(v / 1e3, 3) for k, v in waits},
        "kernel_ms": {k: round(v / 1e3, 3) for k, v in top},
        "kernel_calls": {k: count[k] for k, _ in top},
    }


def gpu_timeline(model, config, engine, cache, B, pos, device, graphed, out_dir) -> dict:
    """One gpu_only step as it runs (graphed when `graphed`), under torch.profiler: the chrome
    trace in `out_dir` and `kernel_gaps` of the step's GPU kernels."""
    from torch.profiler import ProfilerActivity, profile

    set_mode(model, config, engine, "gpu_only")
    time_steps(model, engine, cache, B, pos, 2, device, graphed)  # warm (graphs captured)
    cuda = [ProfilerActivity.CUDA] if device.startswith("cuda") else []
    with profile(activities=[ProfilerActivity.CPU, *cuda]) as prof:
        time_steps(model, engine, cache, B, pos + 2, 1, device, graphed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"gpu_timeline_b{B}_pos{pos}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    kernels = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
               if e.get("cat") == "kernel" and e.get("ph") == "X"]  # fmt: skip
    out = {"trace_file": str(path), **(kernel_gaps(kernels) if kernels else {})}
    if graphed is not None and device.startswith("cuda") and isinstance(cache, PagedKVCache):
        out["one_graph_ms"] = one_graph_ms(model, cache, B, pos + 3, device)
    return out


def one_graph_ms(model, cache, B: int, pos: int, device: str, reps: int = 20) -> float:
    """The same gpu_only step captured whole in one CUDA graph (the segments run eagerly inside
    the capture: no boundary between them), replayed at one position: what the step's segment
    boundaries cost, by difference. Possible only because nothing in it waits for the host."""
    from bench.gpu_floor import cuda_ms

    batch = decode_batch(cache, range(B), 1, pos + 1, device)
    ids = torch.zeros(B, dtype=torch.long, device=device)
    eager = GraphedDecoder(model, cache, graphs=False, batch=B, pages=batch.page_table.shape[1])
    args = ids, batch.positions, batch.page_table, batch.slot_mapping, batch.ctx_lens
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager.paged_step(*args)  # warm-up off the capture; flashinfer's plan made (host)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the step without its inputs' copies and plan (host work)
        eager.step(ids, batch.positions)
    return round(cuda_ms(graph.replay, reps), 3)
