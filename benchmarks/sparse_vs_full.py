"""Training cost of each attention type at a 32 x 32 image grid (1024 image tokens), relative to ``full``.

Prints one JSON line per measurement:

- ``"kind": "dalle_step"``: forward + backward of a DALLE training step (loss on text and image codes), for
  every attention type with its fast kernel and, for the sparse types, with the dense-mask reference path.
  All models live in one process and are timed round-robin, one step each per round, and the fastest step
  is kept: on a shared machine that is the measurement least disturbed by other work.
- ``"kind": "attention"``: forward + backward of the attention kernel alone on random q, k, v.
- ``"kind": "memory"``: activations saved for the backward pass (counted exactly, per storage) and the peak
  resident memory (VmHWM) of a fresh subprocess that runs two training steps of one configuration.

    python benchmarks/sparse_vs_full.py                                   # text_seq_len 256, batch 1
    python benchmarks/sparse_vs_full.py --text-seq-len 32 --batch 2 --rounds 8
    python benchmarks/sparse_vs_full.py --text-seq-len 32 --batch 2 --attn-dropout 0.1   # with attention dropout

On a machine shared with other work, OpenMP's default spin-waiting makes every extra kernel launch cost a
wait for a descheduled thread; run with OMP_WAIT_POLICY=PASSIVE (or --threads 1) for comparable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")
SIZES = (
    "fmap", "text_seq_len", "text_tokens", "image_tokens", "dim", "depth", "heads", "dim_head", "batch", "attn_dropout"
)  # fmt: skip


def _dalle(args: argparse.Namespace, attn_type: str, fast: bool):
    import torch

    from dalle_pytorch import DALLE, DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=args.fmap * 8, num_layers=3, num_tokens=args.image_tokens, codebook_dim=64)
    dalle = DALLE(
        dim=args.dim, vae=vae, num_text_tokens=args.text_tokens, text_seq_len=args.text_seq_len, depth=args.depth,
        heads=args.heads, dim_head=args.dim_head, attn_types=(attn_type,), attn_dropout=args.attn_dropout,
    )  # fmt: skip
    dalle.transformer.fast_path = fast
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, args.text_tokens, (args.batch, args.text_seq_len), generator=generator)
    codes = torch.randint(0, args.image_tokens, (args.batch, args.fmap**2), generator=generator)

    def loss():
        return dalle(text, codes, return_loss=True)

    def step():
        dalle.zero_grad(set_to_none=True)
        loss().backward()

    return loss, step


def _configs(args: argparse.Namespace) -> list[tuple[str, bool]]:
    types = args.types.split(",")
    return [(t, True) for t in types] + ([] if args.no_dense_reference else [(t, False) for t in types if t != "full"])


def _path(attn_type: str, fast: bool) -> str:
    return "causal_kernel" if attn_type == "full" else "fast" if fast else "dense_mask"


def _round_robin(steps: dict, rounds: int) -> dict:
    """Time every step function once per round, interleaved; returns per key (wall seconds, cpu seconds)."""
    for step in steps.values():
        step()  # warm-up
    times: dict = {key: ([], []) for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[key][0].append(time.perf_counter() - wall)
            times[key][1].append(time.process_time() - cpu)
    return times


def _report(kind: str, times: dict, args: argparse.Namespace, extra: dict) -> None:
    best = {key: min(walls) for key, (walls, _) in times.items()}
    best_cpu = {key: min(cpus) for key, (_, cpus) in times.items()}
    reference = ("full", True)
    for (attn_type, fast), (walls, _) in times.items():
        line = {
            "kind": kind, "attn_type": attn_type, "path": _path(attn_type, fast),
            "time_s": round(best[(attn_type, fast)], 4), "time_s_median": round(statistics.median(walls), 4),
            "speedup_vs_full": round(best[reference] / best[(attn_type, fast)], 2),
            "cpu_time_speedup_vs_full": round(best_cpu[reference] / best_cpu[(attn_type, fast)], 2),
            "config": {**{k: getattr(args, k) for k in SIZES}, "threads": args.threads, "rounds": args.rounds,
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), **extra},
        }  # fmt: skip
        print(json.dumps(line), flush=True)


def time_dalle_steps(args: argparse.Namespace) -> None:
    steps = {config: _dalle(args, *config)[1] for config in _configs(args)}
    _report("dalle_step", _round_robin(steps, args.rounds), args, {})


def time_attention(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from dalle_pytorch.attention import attention_mask
    from dalle_pytorch.attention.patterns import pattern_attention
    from dalle_pytorch.kernels.dropout_attention import dropout_attention

    text_len, n = args.text_seq_len + 1, args.text_seq_len + args.fmap**2  # DALLE's input: [BOS, text, image[:-1]]
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, n, args.dim_head)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))

    def step_for(attn_type: str, fast: bool):
        mask = None if attn_type == "full" else attention_mask(attn_type, text_len, args.fmap)[:n, :n]

        def step():  # the kernels DALLE's Attention runs at this size (with dropout: chunked ones)
            q.grad = k.grad = v.grad = None
            p = args.attn_dropout
            if fast and attn_type != "full":
                out = pattern_attention(attn_type, q, k, v, text_len, args.fmap, dropout_p=p)
            elif p:
                out = dropout_attention(q, k, v, mask, causal=mask is None, dropout_p=p)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            out.sum().backward()

        return step

    steps = {config: step_for(*config) for config in _configs(args)}
    _report("attention", _round_robin(steps, args.rounds), args, {})


def measure_memory(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: saved activations and peak resident memory of two steps."""
    import torch

    loss, step = _dalle(args, args.attn_type, bool(args.fast_path))
    saved: dict = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    value.backward()
    del value
    step()
    return {"saved_activations_mb": sum(saved.values()) / 2**20, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; unlike ru_maxrss, exec resets it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory(args: argparse.Namespace) -> None:
    results = {}
    shared = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in (*SIZES, "threads")]
    for attn_type, fast in _configs(args):
        command = [sys.executable, __file__, *shared, f"--attn-type={attn_type}", f"--fast-path={int(fast)}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[(attn_type, fast)] = json.loads(out.strip().splitlines()[-1])
    reference = results[("full", True)]
    for (attn_type, fast), m in results.items():
        line = {
            "kind": "memory", "attn_type": attn_type, "path": _path(attn_type, fast),
            "saved_activations_mb": round(m["saved_activations_mb"], 1),
            "saved_activations_vs_full": round(m["saved_activations_mb"] / reference["saved_activations_mb"], 3),
            "peak_rss_mb": round(m["peak_rss_mb"]),
            "peak_rss_vs_full": round(m["peak_rss_mb"] / reference["peak_rss_mb"], 3),
            "config": {**{k: getattr(args, k) for k in SIZES}, "threads": args.threads},
        }  # fmt: skip
        print(json.dumps(line), flush=True)


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
    parser.add_argument("--attn-dropout", type=float, default=0.0, help="attention dropout of every layer")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration, interleaved")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated attention types")
    parser.add_argument("--no-dense-reference", action="store_true", help="skip the sparse types' dense-mask path")
    parser.add_argument("--only", choices=("attention", "dalle_step", "memory"), help="run one kind only")
    parser.add_argument("--attn-type", help=argparse.SUPPRESS)  # internal: memory of one configuration
    parser.add_argument("--fast-path", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.attn_type:
        print(json.dumps(measure_memory(args)))
        return
    for kind, run in (("memory", memory), ("attention", time_attention), ("dalle_step", time_dalle_steps)):
        if args.only in (None, kind):
            run(args)


if __name__ == "__main__":
    main()
