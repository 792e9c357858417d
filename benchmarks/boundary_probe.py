"""What a kernel boundary costs a batch-1 decode layer's weight stream, and what a persistent kernel would save.

    PYTHONPATH=src python3 benchmarks/boundary_probe.py          # on the GPU: writes $OUT/boundary_probe.json
    TRITON_INTERPRET=1 python3 benchmarks/boundary_probe.py --check   # on the CPU: the kernels' sums, tiny sizes

A Scout layer at one token reads ~315 MB of weights in a chain of kernels; between them the GPU drains one grid
and ramps the next. This probe reads the same bytes per "layer" (segments of 37 / 26 / 168 / 84 MB: qkv, o, both
gate-ups, both downs) of 6 distinct layers (1.9 GB, far past the 50 MB L2) inside one CUDA graph, five ways:

- kernels: one plain read kernel per segment (64 KB per program), in stream order;
- kernels_pdl: the same as programmatic dependents (each program calls `gdc_launch_dependents` and `gdc_wait`
  at its start: the next grid's programs may launch during the previous one's tail);
- persistent: one kernel per layer, 1 / 2 / 4 / 8 programs per SM (those that fit on an SM at once: a grid barrier
  deadlocks otherwise), each walking its share of every segment, a grid barrier (an arrival counter and a spin)
  between segments: the boundaries of a per-layer megakernel;
- persistent_nobarrier: the same without the barriers (the stream such a kernel could reach);
- persistent_dynamic (_nobarrier): the same, each program taking its next chunk from a per-segment work counter
  (an atomic) instead of a fixed stride: the load balance a plain grid gets from the block scheduler;
- one_kernel: one plain read kernel over the layer's 315 MB (no boundary at all).

Per layer: microseconds and TB/s; the boundary cost of a variant is its time minus one_kernel's, over 3
boundaries. Nothing is written but one float per program (the sums keep the loads alive).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl
from hbm_read_probe import _read_kernel, gdc_wait  # benchmarks/ (this script's folder) is on sys.path

SEGMENTS_MB = (37.2, 26.2, 167.8, 83.9)  # Scout FP8 at one token: qkv, o, routed + shared gate-up, both downs
BLOCK, STEPS = 2048, 8  # float32 elements per load and loads per chunk: 64 KB per chunk


@triton.jit
def _read_chunks(X, n, acc, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """This program's share of one segment: chunks pid, pid + P, ... of BLOCK * STEPS elements."""
    for c in range(tl.program_id(0), tl.cdiv(n, BLOCK * STEPS), tl.num_programs(0)):
        base = c * (BLOCK * STEPS)  # int32: a segment holds < 2**31 elements
        for i in range(STEPS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0.0)
    return acc


@triton.jit
def _read_chunks_dynamic(X, n, acc, Work, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """The same, but each program takes the segment's next chunk from a work counter until none is left (the
    balance a plain grid gets from the hardware's block scheduler)."""
    c = tl.atomic_add(Work, 1)
    while c < tl.cdiv(n, BLOCK * STEPS):
        base = c * (BLOCK * STEPS)
        for i in range(STEPS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0.0)
        c = tl.atomic_add(Work, 1)
    return acc


@triton.jit
def _segment(X, n, acc, Work, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """One segment's share for this program: fixed strided chunks, or (DYNAMIC) chunks from the work counter."""
    if DYNAMIC:
        acc = _read_chunks_dynamic(X, n, acc, Work, BLOCK, STEPS)
    else:
        acc = _read_chunks(X, n, acc, BLOCK, STEPS)
    return acc


@triton.jit
def _grid_barrier(Counter, target):
    """Every program of the grid arrives (release), then spins until `target` have (acquire)."""
    tl.debug_barrier()
    tl.atomic_add(Counter, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(Counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(Counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persistent_kernel(X0, X1, X2, X3, n0, n1, n2, n3, Out, Counter, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                       BARRIER: tl.constexpr, DYNAMIC: tl.constexpr = False):
    """Counter[0]: the barrier's arrivals; Counter[1 + s]: segment s's next chunk (DYNAMIC)."""
    acc = tl.zeros([BLOCK], tl.float32)
    p = tl.num_programs(0)
    acc = _segment(X0, n0, acc, Counter + 1, DYNAMIC, BLOCK, STEPS)
    if BARRIER:
        _grid_barrier(Counter, p)
    acc = _segment(X1, n1, acc, Counter + 2, DYNAMIC, BLOCK, STEPS)
    if BARRIER:
        _grid_barrier(Counter, 2 * p)
    acc = _segment(X2, n2, acc, Counter + 3, DYNAMIC, BLOCK, STEPS)
    if BARRIER:
        _grid_barrier(Counter, 3 * p)
    acc = _segment(X3, n3, acc, Counter + 4, DYNAMIC, BLOCK, STEPS)
    tl.store(Out + tl.program_id(0), tl.sum(acc, 0))


def _layer_fns(segs: list[torch.Tensor], whole: torch.Tensor, out: torch.Tensor, counter: torch.Tensor,
               programs: int) -> dict:
    chunk = BLOCK * STEPS
    pdl = {"PDL": True, "launch_pdl": True} if gdc_wait is not None and torch.cuda.is_available() else None

    def kernels(use_pdl: bool = False) -> None:
        for s in segs:
            _read_kernel[(triton.cdiv(s.numel(), chunk),)](s, out, s.numel(), BLOCK=BLOCK, STEPS=STEPS,
                                                          num_warps=8, **(pdl if use_pdl else {}))

    def persistent(barrier: bool, dynamic: bool = False) -> None:
        if barrier or dynamic:
            counter.zero_()
        _persistent_kernel[(programs,)](*segs, *(s.numel() for s in segs), out, counter, BLOCK=BLOCK, STEPS=STEPS,
                                        BARRIER=barrier, DYNAMIC=dynamic, num_warps=8)

    def one_kernel() -> None:
        _read_kernel[(triton.cdiv(whole.numel(), chunk),)](whole, out, whole.numel(), BLOCK=BLOCK, STEPS=STEPS,
                                                           num_warps=8)

    fns = {"kernels": kernels, "persistent": lambda: persistent(True),
           "persistent_nobarrier": lambda: persistent(False), "persistent_dynamic": lambda: persistent(True, True),
           "persistent_dynamic_nobarrier": lambda: persistent(False, True), "one_kernel": one_kernel}
    if pdl is not None:
        fns["kernels_pdl"] = lambda: kernels(True)
    return fns


def _resident_per_sm(segs: list[torch.Tensor], out: torch.Tensor, counter: torch.Tensor, props) -> int:
    """How many programs of the barrier kernel one SM holds at once (threads and registers; it uses no shared
    memory beyond the reduction's), from the compiled kernel."""
    regs = 1
    for dynamic in (False, True):
        k = _persistent_kernel.warmup(*segs, *(s.numel() for s in segs), out, counter, BLOCK=BLOCK, STEPS=STEPS,
                                      BARRIER=True, DYNAMIC=dynamic, num_warps=8, grid=(1,))
        k._init_handles()  # loads the module: n_regs is known from then on
        regs = max(regs, int(k.n_regs))
    threads = 8 * 32
    return min(props.max_threads_per_multi_processor // threads, 65536 // (threads * regs))


def check() -> None:
    """CPU (TRITON_INTERPRET=1): each variant's per-program sums add up to the data's sum (one program for the
    persistent kernel: the interpreter runs programs one after another, so a spin would never end)."""
    torch.manual_seed(0)
    sizes = (5000, 3000, 40000, 17000)
    segs = [torch.rand(n) for n in sizes]
    whole = torch.cat(segs)
    want = float(whole.double().sum())
    out = torch.zeros(1024)
    counter = torch.zeros(8, dtype=torch.int32)
    for name, fn in _layer_fns(segs, whole, out, counter, programs=1).items():
        out.zero_()
        fn()
        got = float(out.double().sum())
        if name == "kernels":  # four launches write over each other's first programs: check the last alone
            got = float(out[: triton.cdiv(sizes[-1], BLOCK * STEPS)].double().sum())
            want_name = float(segs[-1].double().sum())
        else:
            want_name = want
        assert abs(got - want_name) < 1e-3 * abs(want_name), (name, got, want_name)
        print(f"{name}: ok")


def main() -> None:
    dev = torch.device("cuda")
    layers = 6
    props = torch.cuda.get_device_properties(dev)
    res: dict = {"device": props.name, "sms": props.multi_processor_count, "segments_MB": SEGMENTS_MB,
                 "layers": layers}
    per_layer = [[torch.rand(int(mb * 1e6 / 4), device=dev) for mb in SEGMENTS_MB] for _ in range(layers)]
    wholes = [torch.cat(s) for s in per_layer]
    layer_bytes = sum(s.numel() * 4 for s in per_layer[0])
    out = torch.zeros(1 << 16, device=dev)
    counter = torch.zeros(8, dtype=torch.int32, device=dev)
    resident = _resident_per_sm(per_layer[0], out, counter, props)
    res["persistent_resident_per_sm"] = resident
    for per_sm in (1, 2, 4, 8):
        if per_sm > resident:  # a grid barrier spins forever unless every program is resident at once
            continue
        programs = props.multi_processor_count * per_sm
        fns = [_layer_fns(per_layer[i], wholes[i], out, counter, programs) for i in range(layers)]
        for variant in ("kernels", "kernels_pdl", "persistent", "persistent_nobarrier", "persistent_dynamic",
                        "persistent_dynamic_nobarrier", "one_kernel"):
            if (per_sm > 1 and not variant.startswith("persistent")) or variant not in fns[0]:
                continue
            for f in fns:  # compile and warm up
                f[variant]()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for f in fns:
                    f[variant]()
            g.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) * 1e3 / (reps * layers)
            key = variant if per_sm == 1 else f"{variant}_{per_sm}_per_sm"
            res[key] = {"us_per_layer": round(us, 2), "TBps": round(layer_bytes / us / 1e6, 3)}
            print(key, res[key], flush=True)
    base = res["one_kernel"]["us_per_layer"]
    res["boundary_cost_us"] = {k: round((v["us_per_layer"] - base) / 3, 2) for k, v in res.items()
                               if isinstance(v, dict) and "us_per_layer" in v and k != "one_kernel"}
    print(json.dumps(res["boundary_cost_us"]))
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "boundary_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    if "--check" in sys.argv:
        check()
    else:
        main()
