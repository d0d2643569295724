"""torch.compile against eager (the DALLE, CLIP and VAE training steps, the cached decoding step) and bf16
autocast against fp32 (the DALLE training step).

Each function is ``(device, quick, **params) -> dict`` and runs in its own process (see ``run.py``), like
the cases in ``cases.py``. Compilation happens in the first call, which is timed apart (``compile_s``: the
first call's time minus a steady call's); the repeats then time steady steps. Eager (and fp32) figures come
from the same process and model, so the ratios compare like with like on a shared machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from benchmarks.cases import (
    BUDGET_S,
    COND_SCALE,
    GEN_BATCH,
    StepClock,
    TrainCase,
    _dalle,
    _EnoughSteps,
    _seeded,
    _text_and_codes,
    _train_step,
    clip_case,
    dalle_case,
    timed_train,
    vae_case,
)
from benchmarks.harness import time_repeats, timed

COMPILE_GEN_TOKENS = {False: 256, True: 16}


def _cold_compile_caches():
    """Inductor's on-disk caches off, so ``compile_s`` is the time a new machine pays, not a cache hit."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False)


def _eager_and_compiled(case: TrainCase, device: torch.device, quick: bool, backend: str) -> dict:
    """The training step of ``case`` eager, then with the model compiled (as ``Trainer(compile=...)`` does:
    the forward and backward of the compiled wrapper, AdamW on the original parameters), in this process."""
    eager = timed_train(case, device, quick)
    compiled = torch.compile(case.model, backend=backend)
    step, _ = _train_step(case.model, lambda: case.loss(compiled))
    with _cold_compile_caches():
        first_s, _ = timed(step, device)
    stats = time_repeats(step, device=device, budget_s=BUDGET_S[quick])
    return {**stats, **case.fields, "config": {**case.fields["config"], "backend": backend},
            "compile_s": first_s - stats["median_s"], "eager_median_s": eager["median_s"],
            "speedup_vs_eager": eager["median_s"] / stats["median_s"]}  # fmt: skip


def dalle_train_compiled(device: torch.device, quick: bool, backend: str = "inductor") -> dict:
    """The ``dalle_train_full`` step eager and compiled."""
    return _eager_and_compiled(dalle_case(device, quick, "full"), device, quick, backend)


def clip_train_compiled(device: torch.device, quick: bool, backend: str = "inductor") -> dict:
    """The ``clip_train`` step eager and compiled."""
    return _eager_and_compiled(clip_case(device, quick), device, quick, backend)


def vae_train_compiled(device: torch.device, quick: bool, backend: str = "inductor") -> dict:
    """The ``vae_train`` step eager and compiled."""
    return _eager_and_compiled(vae_case(device, quick), device, quick, backend)


def dalle_train_bf16(device: torch.device, quick: bool) -> dict:
    """The ``dalle_train_full`` step in fp32, then with the forward under bf16 autocast as the Trainer runs
    ``precision="bf16"`` (backward outside autocast, fp32 weights and AdamW, no loss scaling), in this process."""
    case = dalle_case(device, quick, "full")
    fp32 = timed_train(case, device, quick)

    def loss(module: torch.nn.Module) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return case.loss(module)

    bf16 = timed_train(case._replace(loss=loss), device, quick)
    return {**bf16, "config": {**case.fields["config"], "precision": "bf16 autocast"},
            "fp32_median_s": fp32["median_s"], "speedup_vs_fp32": fp32["median_s"] / bf16["median_s"],
            "mfu_reference": "the fp32 matmul rate"}  # fmt: skip


def gen_compiled(device: torch.device, quick: bool, backend: str = "inductor") -> dict:
    """Cached decoding, batch 4 with guidance, eager and compiled steps of the same model and text."""
    tokens = COMPILE_GEN_TOKENS[quick]
    generator = _seeded()
    model, config = _dalle(quick, device, grid=int(tokens**0.5), attn_types=("full",))
    text, _ = _text_and_codes(model, GEN_BATCH, generator, device)

    def run(compile: str | None) -> tuple[float, float]:
        """(total seconds, median decode step ms) of one generation."""
        clock = StepClock(device=device)
        start = time.perf_counter()
        with contextlib.suppress(_EnoughSteps):
            model.generate_image_codes(text, generator=torch.Generator().manual_seed(0), step_logits=clock,
                                       cond_scale=COND_SCALE, compile=compile)  # fmt: skip
        total = time.perf_counter() - start
        steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        return total, 1000 * statistics.median(steps)

    run(None)  # warm-up
    eager = [run(None) for _ in range(2)]
    with _cold_compile_caches():
        first_compiled_s, _ = run(backend)
    compiled = [run(backend) for _ in range(2)]
    eager_s, compiled_s = statistics.median(t for t, _ in eager), statistics.median(t for t, _ in compiled)
    eager_ms, compiled_ms = statistics.median(m for _, m in eager), statistics.median(m for _, m in compiled)
    compile_s = first_compiled_s - compiled_s
    saved_per_image = (eager_s - compiled_s) / GEN_BATCH
    return {"median_s": compiled_s, "min_s": min(t for t, _ in compiled), "max_s": max(t for t, _ in compiled),
            "repeats": len(compiled),
            "config": {**config, "batch": GEN_BATCH, "cond_scale": COND_SCALE, "backend": backend},
            "image_tokens": tokens, "eager_ms_per_token_step": eager_ms, "ms_per_token_step": compiled_ms,
            "step_speedup": eager_ms / compiled_ms, "eager_s_per_run": eager_s, "compile_s": compile_s,
            "break_even_images": compile_s / saved_per_image if saved_per_image > 0 else None,
            "break_even_definition": "images until the faster runs repay compile_s"}  # fmt: skip


def registry(quick: bool) -> dict[str, tuple]:
    """name -> (function, params) of the compiled-vs-eager and bf16-vs-fp32 measurements."""
    return {"dalle_train_compiled": (dalle_train_compiled, {}), "clip_train_compiled": (clip_train_compiled, {}),
            "vae_train_compiled": (vae_train_compiled, {}), "dalle_train_bf16": (dalle_train_bf16, {}),
            "gen_full_compiled": (gen_compiled, {})}  # fmt: skip
