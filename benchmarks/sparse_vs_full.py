"""Training-step time and memory of each attention type at a 32 x 32 image grid, relative to ``full``.

Prints one JSON line per measurement. Each (attention type, fast path) runs in a fresh subprocess, so its
peak resident memory (``ru_maxrss``) belongs to it alone; rounds interleave the types, and the fastest step
of all rounds is reported, which is the least disturbed by other work on a shared machine.

    python benchmarks/sparse_vs_full.py                       # text_seq_len 256, batch 1
    python benchmarks/sparse_vs_full.py --text-seq-len 32 --batch 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args: argparse.Namespace) -> dict:
    """One configuration in this process: time fwd + bwd of DALLE training steps, count saved activations."""
    import torch

    from dalle_pytorch import DALLE, DiscreteVAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=args.fmap * 8, num_layers=3, num_tokens=args.image_tokens, codebook_dim=64)
    dalle = DALLE(
        dim=args.dim, vae=vae, num_text_tokens=args.text_tokens, text_seq_len=args.text_seq_len, depth=args.depth,
        heads=args.heads, dim_head=args.dim_head, attn_types=(args.attn_type,),
    )  # fmt: skip
    dalle.transformer.fast_path = args.fast_path
    text = torch.randint(1, args.text_tokens, (args.batch, args.text_seq_len))
    codes = torch.randint(0, args.image_tokens, (args.batch, args.fmap**2))

    def step():
        dalle.zero_grad(set_to_none=True)
        dalle(text, codes, return_loss=True).backward()

    # bytes kept for the backward pass (activations), counted once per storage
    saved: dict = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dalle(text, codes, return_loss=True)
    del loss
    step()  # warm-up
    baseline = _rss_mb()
    walls, cpus = [], []
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_s": min(walls), "step_s_median": statistics.median(walls), "cpu_s": min(cpus),
        "saved_activations_mb": sum(saved.values()) / 2**20, "peak_rss_mb": peak, "rss_before_steps_mb": baseline,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fmap", type=int, default=32, help="image grid side (tokens per row)")
    parser.add_argument("--text-seq-len", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=10000)
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per configuration, interleaved")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated attention types")
    parser.add_argument("--no-dense-reference", action="store_true", help="skip the sparse types' dense-mask path")
    parser.add_argument("--attn-type", help=argparse.SUPPRESS)  # internal: measure one configuration
    parser.add_argument("--fast-path", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attn_type:
        print(json.dumps(measure(args)))
        return

    configs = [(t, True) for t in args.types.split(",")]
    if not args.no_dense_reference:
        configs += [(t, False) for t in args.types.split(",") if t != "full"]
    runs: dict = {c: [] for c in configs}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--rounds")]
    for _ in range(args.rounds):
        for attn_type, fast in configs:
            command = [sys.executable, __file__, *passthrough, "--attn-type", attn_type, "--fast-path", str(int(fast))]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[(attn_type, fast)].append(json.loads(out.strip().splitlines()[-1]))
    best = {c: min(r, key=lambda m: m["step_s"]) for c, r in runs.items()}
    reference = best[("full", True)]
    for (attn_type, fast), m in best.items():
        line = {
            "attn_type": attn_type, "path": "fast" if fast and attn_type != "full" else "dense_mask",
            "step_s": round(m["step_s"], 3), "step_s_median": round(m["step_s_median"], 3),
            "speedup_vs_full": round(reference["step_s"] / m["step_s"], 2),
            "cpu_speedup_vs_full": round(reference["cpu_s"] / m["cpu_s"], 2),
            "saved_activations_mb": round(m["saved_activations_mb"], 1),
            "activations_vs_full": round(m["saved_activations_mb"] / reference["saved_activations_mb"], 2),
            "peak_rss_mb": round(m["peak_rss_mb"]), "peak_rss_vs_full": round(m["peak_rss_mb"] / reference["peak_rss_mb"], 2),
            "config": {k: getattr(args, k) for k in ("fmap", "text_seq_len", "dim", "depth", "heads", "dim_head", "batch", "threads")},
        }  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
