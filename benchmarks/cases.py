"""The benchmark measurements, each a function ``(device, quick, **params) -> dict`` run in its own process.

Every case builds its models from a seed, times a training step (forward, backward, AdamW step) or a
generation call with warm-up and repeats, and returns its configuration, timing statistics and the model
FLOPs the parent turns into MFU (see ``model_flops``). ``quick`` swaps in tiny sizes.

Sections: matmul (the machine's reference throughput), vae, dalle_train, long (32 x 32 grid per attention
type), generation, reversible_memory, clip.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import model_flops
from benchmarks.harness import MemoryProbe, return_freed_memory_to_os, time_repeats

SPARSE_TYPES = ("axial_row", "axial_col", "conv_like", "sparse")
ATTENTION_TYPES = ("full", *SPARSE_TYPES)

# the full benchmark sizes; quick mode shrinks each
VAE_SIZES = {
    False: dict(image_size=64, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64),
    True: dict(image_size=32, num_layers=2, num_tokens=64, codebook_dim=32, hidden_dim=16),
}
DALLE_SIZES = {
    False: dict(dim=256, depth=4, heads=8, dim_head=32, num_text_tokens=10000, text_seq_len=32),
    True: dict(dim=64, depth=2, heads=4, dim_head=16, num_text_tokens=500, text_seq_len=8),
}
QUICKSTART_SIZES = {  # the README's full-size model: 256 px, 8192 codes, 32 x 32 = 1024 image tokens
    False: dict(dim=1024, depth=12, heads=16, dim_head=64, num_text_tokens=10000, text_seq_len=256),
    True: dict(dim=64, depth=2, heads=4, dim_head=16, num_text_tokens=500, text_seq_len=16),
}
CLIP_SIZES = {
    False: dict(dim_text=256, dim_image=256, dim_latent=256, num_text_tokens=10000, text_enc_depth=2,
                text_seq_len=32, text_heads=8, visual_enc_depth=2, visual_heads=8, visual_image_size=64,
                visual_patch_size=8),
    True: dict(dim_text=64, dim_image=64, dim_latent=64, num_text_tokens=500, text_enc_depth=1, text_seq_len=8,
               text_heads=4, visual_enc_depth=1, visual_heads=4, visual_image_size=32, visual_patch_size=8),
}  # fmt: skip
TRAIN_BATCH = {False: 8, True: 2}
LONG_GRID = {False: 32, True: 8}  # image grid side of the long-sequence comparison
LONG_BATCH = {False: 2, True: 1}
GEN_TOKENS = {False: (16, 64, 256), True: (4, 16)}
GEN_BATCH, COND_SCALE = 4, 3.0
QUICKSTART_WINDOW = {False: 16, True: 4}  # decode steps timed per window of the long generation
REVERSIBLE_DEPTHS = (4, 8, 16)
BUDGET_S = {False: 20.0, True: 1.0}  # timed seconds per case after which repeats stop


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _vae(quick: bool, grid: int | None = None):
    from dalle_pytorch import DiscreteVAE

    sizes = dict(VAE_SIZES[quick])
    if grid is not None:  # image size giving a grid x grid token map
        sizes["image_size"] = grid * 2 ** sizes["num_layers"]
    return DiscreteVAE(**sizes), sizes


def _dalle(quick: bool, device: torch.device, grid: int | None = None, quickstart: bool = False, **options):
    from dalle_pytorch import DALLE

    if quickstart:
        from dalle_pytorch import DiscreteVAE

        vae_sizes = dict(image_size=256, num_layers=3, num_tokens=8192, codebook_dim=512, hidden_dim=64)
        if quick:
            vae_sizes = dict(image_size=32, num_layers=2, num_tokens=64, codebook_dim=32, hidden_dim=16)
        vae = DiscreteVAE(**vae_sizes)
        sizes = dict(QUICKSTART_SIZES[quick])
    else:
        vae, vae_sizes = _vae(quick, grid)
        sizes = dict(DALLE_SIZES[quick])
    sizes.update(options)  # options may override a size (depth)
    model = DALLE(vae=vae, **sizes).to(device)
    config = {**sizes, "vae": vae_sizes, "image_seq_len": model.image_seq_len}
    return model, config


def _text_and_codes(model, batch: int, generator: torch.Generator, device: torch.device):
    text = torch.randint(1, model.num_text_tokens, (batch, model.text_seq_len), generator=generator)
    codes = torch.randint(0, model.num_image_tokens, (batch, model.image_seq_len), generator=generator)
    return text.to(device), codes.to(device)


TRAIN_STEP = "forward + backward + AdamW step (fused kernel when available)"


def _optimizer(params: list) -> torch.optim.Optimizer:
    # the fused kernel is several times faster than the default per-tensor loop on CPU (torch >= 2.4)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


def _train_step(model: torch.nn.Module, loss_fn, set_to_none: bool = True):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params)

    def step():
        optimizer.zero_grad(set_to_none=set_to_none)
        loss_fn().backward()
        optimizer.step()

    return step, optimizer


# ---------------------------------------------------------------------------------------------------------
# 0. the machine's reference: dense fp32 matmul
# ---------------------------------------------------------------------------------------------------------


def matmul(device: torch.device, quick: bool) -> dict:
    """Dense fp32 (n x n) @ (n x n) throughput, the largest median-based GFLOP/s over the sizes being the
    reference; also the memory bandwidth of a large copy (read + write), the other roof of the roofline."""
    sizes = (1024,) if quick else (2048, 3072, 4096)
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        stats = time_repeats(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device=device, warmup=2,
                             repeats=5 if quick else 10, budget_s=BUDGET_S[quick])  # fmt: skip
        per_size[n] = {**stats, "gflops": 2 * n**3 / stats["median_s"] / 1e9,
                       "gflops_per_cpu_s": 2 * n**3 / stats["cpu_median_s"] / 1e9}  # fmt: skip
        del a, b, out
    best = max(per_size, key=lambda n: per_size[n]["gflops"])
    source = torch.randn((8 if quick else 64) * 2**20, device=device)  # 32 or 256 MB
    target = torch.empty_like(source)
    copy = time_repeats(lambda: target.copy_(source), device=device, warmup=1, repeats=5, budget_s=BUDGET_S[quick])
    bandwidth = 2 * source.numel() * source.element_size() / copy["median_s"] / 1e9
    return {**per_size[best], "matmul_gflops": per_size[best]["gflops"], "bandwidth_gbs": bandwidth, "size": best,
            "config": {"sizes": list(sizes), "copy_mb": source.numel() * 4 // 2**20},
            "gflops_by_size": {str(n): round(v["gflops"], 1) for n, v in per_size.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# 1., 2., 6. training steps
# ---------------------------------------------------------------------------------------------------------


class TrainCase(NamedTuple):
    """A model, the loss of one fixed batch through a given module (the model, or a compiled wrapper of it),
    and the result fields the measurement reports besides its timing (config, FLOPs, items)."""

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module], torch.Tensor]
    fields: dict


def timed_train(case: TrainCase, device: torch.device, quick: bool, module: torch.nn.Module | None = None) -> dict:
    """Timing statistics of the training step of ``case`` (forward and backward through ``module``, by default
    the model; AdamW on the model's parameters), with the case's fields."""
    runs = module if module is not None else case.model
    step, _ = _train_step(case.model, lambda: case.loss(runs))
    return {**time_repeats(step, device=device, budget_s=BUDGET_S[quick]), **case.fields}


def vae_case(device: torch.device, quick: bool) -> TrainCase:
    generator = _seeded()
    vae, sizes = _vae(quick)
    vae = vae.to(device)
    batch = TRAIN_BATCH[quick]
    images = torch.rand(batch, 3, sizes["image_size"], sizes["image_size"], generator=generator).to(device)
    with FlopCounterMode(display=False) as counter:  # convolutions and matmuls, forward + backward
        vae(images, return_loss=True).backward()
    vae.zero_grad(set_to_none=True)
    return TrainCase(vae, lambda module: module(images, return_loss=True),
                     {"config": {**sizes, "batch": batch, "step": TRAIN_STEP}, "train_flops": counter.get_total_flops(),
                      "flops_formula": "counted by torch.utils.flop_counter on one forward + backward",
                      "items": batch, "item_name": "images"})  # fmt: skip


def dalle_case(device: torch.device, quick: bool, variant: str = "full") -> TrainCase:
    """variant: ``full`` attention, ``cycled`` (the four sparse types, one per layer) or ``reversible``."""
    options = {
        "full": dict(attn_types=("full",)),
        "cycled": dict(attn_types=SPARSE_TYPES),
        "reversible": dict(attn_types=("full",), reversible=True),
    }[variant]
    generator = _seeded()
    model, config = _dalle(quick, device, **options)
    batch = TRAIN_BATCH[quick]
    text, codes = _text_and_codes(model, batch, generator, device)
    flops = model_flops.DalleFlops(model)
    tokens = batch * (model.text_seq_len + model.image_seq_len)
    return TrainCase(model, lambda module: module(text, codes, return_loss=True),
                     {"config": {**config, "batch": batch, "inputs": "precomputed image codes", "step": TRAIN_STEP},
                      "train_flops": flops.train_step(batch), "flops_formula": model_flops.TRAIN_FORMULA,
                      "items": tokens, "item_name": "tokens"})  # fmt: skip


def clip_case(device: torch.device, quick: bool) -> TrainCase:
    from dalle_pytorch import CLIP

    generator = _seeded()
    sizes = CLIP_SIZES[quick]
    clip = CLIP(**sizes).to(device)
    batch, side = TRAIN_BATCH[quick], sizes["visual_image_size"]
    text = torch.randint(1, sizes["num_text_tokens"], (batch, sizes["text_seq_len"]), generator=generator).to(device)
    images = torch.rand(batch, 3, side, side, generator=generator).to(device)
    tokens = batch * (sizes["text_seq_len"] + (side // sizes["visual_patch_size"]) ** 2)
    return TrainCase(clip, lambda module: module(text, images, return_loss=True),
                     {"config": {**sizes, "batch": batch, "step": TRAIN_STEP},
                      "train_flops": model_flops.clip_train_step(clip, batch, sizes["text_seq_len"]),
                      "flops_formula": model_flops.CLIP_FORMULA, "items": tokens, "item_name": "tokens"})  # fmt: skip


def vae_train(device: torch.device, quick: bool) -> dict:
    return timed_train(vae_case(device, quick), device, quick)


def dalle_train(device: torch.device, quick: bool, variant: str) -> dict:
    return timed_train(dalle_case(device, quick, variant), device, quick)


def clip_train(device: torch.device, quick: bool) -> dict:
    return timed_train(clip_case(device, quick), device, quick)


# ---------------------------------------------------------------------------------------------------------
# 3. long sequences: one attention type on a 32 x 32 grid
# ---------------------------------------------------------------------------------------------------------


def long_sequence(device: torch.device, quick: bool, attn_type: str) -> dict:
    generator = _seeded()
    model, config = _dalle(quick, device, grid=LONG_GRID[quick], attn_types=(attn_type,))
    batch = LONG_BATCH[quick]
    text, codes = _text_and_codes(model, batch, generator, device)
    step, _ = _train_step(model, lambda: model(text, codes, return_loss=True))
    stats = time_repeats(step, device=device, warmup=1, repeats=3, budget_s=BUDGET_S[quick])
    flops = model_flops.DalleFlops(model)
    full_flops = flops.train_step(batch, ["full"] * len(flops.layer_types))
    return {**stats, "config": {**config, "batch": batch, "inputs": "precomputed image codes", "step": TRAIN_STEP},
            "train_flops": flops.train_step(batch), "flops_formula": model_flops.TRAIN_FORMULA,
            "items": batch * (model.text_seq_len + model.image_seq_len), "item_name": "tokens",
            # the speed-up over full attention if time followed model FLOPs exactly
            "flops_speedup_bound": full_flops / flops.train_step(batch)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# 4. generation
# ---------------------------------------------------------------------------------------------------------


class _EnoughSteps(Exception):
    pass


class StepClock(list):
    """A ``step_logits`` list that records when each sampled token's logits were ready (and drops them).

    ``generate_image_codes`` appends once per sampled token, so the gaps between appends are the decoding
    steps and the first append ends the prefill. With ``stop_after`` it ends generation after that many.
    """

    def __init__(self, device: torch.device, stop_after: int | None = None):
        super().__init__()
        self.device, self.stop_after, self.times, self.cpu_times = device, stop_after, [], []

    def append(self, _logits) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if self.stop_after is not None and len(self.times) >= self.stop_after:
            raise _EnoughSteps


def _timed_generation(model, text, generator_seed: int, clock: StepClock, **options) -> tuple[float, list]:
    """Run one generation; returns (prefill seconds, decode step seconds)."""
    start = time.perf_counter()
    with contextlib.suppress(_EnoughSteps):
        model.generate_image_codes(text, generator=torch.Generator().manual_seed(generator_seed),
                                   step_logits=clock, **options)  # fmt: skip
    times = [start, *clock.times]
    return times[1] - times[0], [b - a for a, b in zip(times[1:], times[2:])]


def generation(device: torch.device, quick: bool, attn_type: str, tokens: int, cached: bool) -> dict:
    generator = _seeded()
    model, config = _dalle(quick, device, grid=math.isqrt(tokens), attn_types=(attn_type,))
    text, _ = _text_and_codes(model, GEN_BATCH, generator, device)
    runs, cpu_step_ms = [], []

    def run():
        clock = StepClock(device=device)
        runs.append(_timed_generation(model, text, len(runs), clock, cond_scale=COND_SCALE, use_cache=cached))
        cpu_step_ms.append(1000 * (clock.cpu_times[-1] - clock.cpu_times[0]) / (len(clock.cpu_times) - 1))

    stats = time_repeats(run, device=device, warmup=1, repeats=3, budget_s=BUDGET_S[quick])
    timed = runs[-stats["repeats"] :]
    step_ms = statistics.median(1000 * statistics.mean(steps) for _, steps in timed)
    flops = model_flops.DalleFlops(model)
    steps_flops = flops.generation_steps(GEN_BATCH, guided=True, cached=cached)
    step_bytes = [flops.generation_step_bytes(GEN_BATCH, guided=True, token=t) for t in range(1, tokens)]
    return {**stats, "config": {**config, "batch": GEN_BATCH, "cond_scale": COND_SCALE, "use_cache": cached},
            "image_tokens": tokens, "prefill_s": statistics.median(p for p, _ in timed),
            "ms_per_token_step": step_ms, "ms_per_token_step_cpu": statistics.median(cpu_step_ms[-stats["repeats"] :]),
            "matmul_flops": sum(steps_flops),
            "step_matmul_flops": statistics.mean(steps_flops[1:]), "flops_formula": model_flops.GENERATION_FORMULA,
            **({"step_bytes": statistics.mean(step_bytes)} if cached else {}),
            "ms_per_token_step_definition": "mean time between sampled tokens, prefill excluded"}  # fmt: skip


def generation_quickstart(device: torch.device, quick: bool) -> dict:
    """The README's full-size model with the cache, batch 4 with guidance: too long to run to the end.

    Times ``window`` decode steps right after the text prefill (window A) and ``window`` steps at the end of
    the image (window B, after a prefill of text + random primed codes), takes the median step of each, and
    extrapolates linearly in the position to all steps.
    """
    generator = _seeded()
    window = QUICKSTART_WINDOW[quick]
    model, config = _dalle(quick, device, quickstart=True)
    text, codes = _text_and_codes(model, GEN_BATCH, generator, device)
    n = model.image_seq_len
    options = dict(cond_scale=COND_SCALE, use_cache=True)
    start = time.perf_counter()
    prefill_a, steps_a = _timed_generation(model, text, 0, StepClock(device, stop_after=window + 1), **options)
    primed = n - window - 1
    prefill_b, steps_b = _timed_generation(model, text, 1, StepClock(device), img=codes,
                                           num_init_img_tokens=primed, **options)  # fmt: skip
    elapsed = time.perf_counter() - start
    step_a, step_b = statistics.median(steps_a), statistics.median(steps_b)
    # decode step t (1 <= t < n) samples token t; window A covers t = 1..window, window B t = n-window..n-1
    centre_a, centre_b = (1 + window) / 2, (2 * n - window - 1) / 2
    mean_step = step_a + (step_b - step_a) * (n / 2 - centre_a) / (centre_b - centre_a)  # linear, at mean t
    counter = model_flops.DalleFlops(model)
    flops = counter.generation_steps(GEN_BATCH, guided=True, cached=True)
    step_bytes = [counter.generation_step_bytes(GEN_BATCH, guided=True, token=t) for t in range(1, n)]
    return {"median_s": prefill_a + (n - 1) * mean_step, "min_s": None, "max_s": None, "repeats": 1,
            "extrapolated": True, "measured_s": elapsed,
            "extrapolation": f"prefill + {n - 1} decode steps, step time linear in position through the median "
                             f"steps of {window} after the text prefill and {window} at the end of the image",
            "config": {**config, "batch": GEN_BATCH, "cond_scale": COND_SCALE, "use_cache": True},
            "image_tokens": n, "prefill_s": prefill_a, "prefill_primed_s": prefill_b,
            "ms_per_token_step": 1000 * mean_step, "ms_step_window_start": 1000 * step_a,
            "ms_step_window_end": 1000 * step_b, "matmul_flops": sum(flops),
            "step_matmul_flops": statistics.mean(flops[1:]), "step_matmul_flops_window_start": statistics.mean(
                flops[1 : window + 1]), "step_matmul_flops_window_end": statistics.mean(flops[-window:]),
            "step_bytes": statistics.mean(step_bytes), "step_bytes_window_start": statistics.mean(step_bytes[:window]),
            "step_bytes_window_end": statistics.mean(step_bytes[-window:]),
            "flops_formula": model_flops.GENERATION_FORMULA}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# 5. reversible memory
# ---------------------------------------------------------------------------------------------------------


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2**20


def _warm_up_runtime(quick: bool, device: torch.device, reversible: bool, generator: torch.Generator) -> None:
    model, _ = _dalle(quick, device, attn_types=("full",), depth=1, reversible=reversible)
    text, codes = _text_and_codes(model, TRAIN_BATCH[quick], generator, device)
    step, _ = _train_step(model, lambda: model(text, codes, return_loss=True))
    step()
    gc.collect()


def reversible_memory(device: torch.device, quick: bool, depth: int, reversible: bool) -> dict:
    """Peak training memory = state (weights, buffers, gradients, AdamW moments) + the peak of forward + backward.

    The state is counted from its tensors; the forward + backward peak is measured (high-water RSS above
    the RSS before it). Gradients stay allocated between steps (``zero_grad(set_to_none=False)``), so the
    measured peak is activations and temporaries only. A throw-away depth-1 step first pays the runtime's
    one-time allocations, so they are not charged to the model.
    """
    freed_to_os = device.type == "cpu" and return_freed_memory_to_os()
    probe = MemoryProbe(device)
    generator = _seeded()
    _warm_up_runtime(quick, device, reversible, generator)
    before = probe.now_mb()
    model, config = _dalle(quick, device, attn_types=("full",), depth=depth, reversible=reversible)
    batch = TRAIN_BATCH[quick]
    text, codes = _text_and_codes(model, batch, generator, device)
    loss_fn = lambda: model(text, codes, return_loss=True)  # noqa: E731
    step, optimizer = _train_step(model, loss_fn, set_to_none=False)
    step()  # allocates gradients and optimizer moments
    gc.collect()
    state_rss = probe.now_mb()
    reset_ok = probe.reset_peak()
    optimizer.zero_grad(set_to_none=False)
    loss_fn().backward()
    activation = probe.peak_mb() - state_rss if reset_ok and state_rss is not None else None
    optimizer.step()
    stats = time_repeats(step, device=device, warmup=0, repeats=3, budget_s=BUDGET_S[quick])
    moments = [t for per_param in optimizer.state.values() for t in per_param.values()]
    grads = [p.grad for p in model.parameters()]
    state_mb = _tensor_mb([*model.parameters(), *model.buffers(), *grads, *moments])
    return {**stats, "config": {**config, "batch": batch},
            "state_mb": state_mb, "activation_mb": activation,
            "train_memory_mb": state_mb + activation if activation is not None else None,
            "state_rss_mb": state_rss - before if None not in (state_rss, before) else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "freed_memory_returned_to_os": freed_to_os}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------


def registry(quick: bool) -> dict[str, tuple]:
    """name -> (function, params), in the order they run. ``matmul`` comes first: the others refer to it."""
    cases: dict[str, tuple] = {"matmul": (matmul, {})}
    cases["vae_train"] = (vae_train, {})
    for variant in ("full", "cycled", "reversible"):
        cases[f"dalle_train_{variant}"] = (dalle_train, {"variant": variant})
    for attn_type in ATTENTION_TYPES:
        cases[f"long_{attn_type}"] = (long_sequence, {"attn_type": attn_type})
    for tokens in GEN_TOKENS[quick]:
        for attn_type in ATTENTION_TYPES:
            for cached in (True, False):
                name = f"gen_{attn_type}_{tokens}_{'cached' if cached else 'uncached'}"
                cases[name] = (generation, {"attn_type": attn_type, "tokens": tokens, "cached": cached})
    cases["gen_quickstart_cached"] = (generation_quickstart, {})
    for depth in REVERSIBLE_DEPTHS:
        for reversible in (False, True):
            name = f"memory_{'reversible' if reversible else 'plain'}_depth{depth}"
            cases[name] = (reversible_memory, {"depth": depth, "reversible": reversible})
    cases["clip_train"] = (clip_train, {})
    return cases
