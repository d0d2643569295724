"""Decoding with lower-precision weights: the cached step of the dim 1024 / depth 12 model in fp32, bf16 and
int8 (``DALLE.decoding_copy``), against its memory floor.

A cached step at this size is bound by memory traffic: it reads every matmul weight once and the cached
keys and values it attends to. The floor is ``(weight bytes + key/value bytes) / bandwidth``, the bytes
counted in the dtypes the step actually reads and the bandwidth the ``matmul`` case measures.

The step is timed at three positions of the image (its first, middle and last token) on a key/value cache
filled with random values, so no prefill of the 1280-position prompt is needed: the step's work and bytes
depend only on its position. Decode step time is linear in the position, so the middle step is the mean
step of a whole generation. Each timed step is the generation loop's: the cached transformer step and the
logit head, guidance, top-k filtering and sampling.

Each function is ``(device, quick, **params) -> dict`` and runs in its own process (see ``run.py``).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from benchmarks import model_flops
from benchmarks.cases import COND_SCALE, GEN_BATCH, QUICKSTART_WINDOW, _dalle, _seeded
from benchmarks.harness import timed
from dalle_pytorch.kernels.int8_linear import Int8Linear
from dalle_pytorch.kernels.packed_linear import packed_linears
from dalle_pytorch.models.precision import DECODING_PRECISIONS as PRECISIONS
from dalle_pytorch.models.sampling import filter_logits, guide, sample
from dalle_pytorch.models.static_decoding import compiled_step_fn, shift_sources
from dalle_pytorch.models.transformer import DecodingCache

FLOOR_FORMULA = (
    "(bytes of the matmul weights of the transformer and image logit head, in their stored dtype (int8 +"
    " per-channel scales) + 2 * rows * inner * element size of the cache * sum_layers(keys the new query"
    " sees)) / bandwidth_gbs of the matmul case; rows = 2 * batch with guidance"
)


def matmul_weight_bytes(modules) -> int:
    """Bytes of the matmul weights inside ``modules`` as stored: nn.Linear weights, or Int8Linear int8 weights
    and scales (biases, norms and embedding rows are a rounding error next to them and not counted)."""
    total, seen = 0, set()
    for module in modules:
        for m in module.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, nn.Linear):
                total += m.weight.numel() * m.weight.element_size()
            elif isinstance(m, Int8Linear):
                total += m.weight_int8.numel() * m.weight_int8.element_size() + m.scale.numel() * m.scale.element_size()
    return total


def _random_cache(model, new: torch.Tensor, grid: int, generator: torch.Generator) -> DecodingCache:
    """A decoding cache at the position of image token ``grid`` whose earlier keys, values and token-shift
    history are random (one step allocates the buffers, then they are overwritten)."""
    cache = DecodingCache(model.seq_len)
    cache.offset = model.text_len + grid
    model._decode_step(new, grid, True, cache)
    for buffer in cache._buffers.values():
        noise = torch.randn(buffer.shape, generator=generator).mul_(0.5)
        buffer.copy_(noise.to(buffer.dtype))
    return cache


def _step_fn(model, compile: str | None):
    """``step(new, grid, cache) -> logits``: the generation loop's cached step (eager, or compiled as
    ``generate_image_codes(compile=...)`` compiles it)."""
    if compile is None:
        return lambda new, grid, cache: model._decode_step(new, grid, True, cache)
    compiled, sources = compiled_step_fn(compile), shift_sources(model.transformer)

    def step(new, grid, cache):
        position = torch.full((1,), grid, device=new.device)
        return compiled(model, new, position, cache._buffers, position + model.text_len, sources, True).float()

    return step


def gen_precision(device: torch.device, quick: bool, precision: str, compile: str | None = None) -> dict:
    """The cached decoding step of the README's full-size model, batch 4 with guidance, in ``precision``;
    with ``compile`` (a torch.compile backend) the compiled static-cache step, its compile time apart."""
    generator = _seeded()
    window = QUICKSTART_WINDOW[quick]
    model, config = _dalle(quick, device, quickstart=True)
    counter = model_flops.DalleFlops(model)
    started = time.perf_counter()
    if precision != "fp32":
        model = model.decoding_copy(precision)  # the fp32 model is dropped: one copy of the weights in memory
    model.eval()
    prepare_s = time.perf_counter() - started
    weight_bytes = matmul_weight_bytes([model.transformer.layers, model.to_image_logits])
    cache_dtype = model.text_emb.weight.dtype
    n = model.image_seq_len
    positions = {"start": 1, "middle": n // 2, "end": n - 1}
    step_ms, step_bytes, first_ms = {}, {}, []
    decode = _step_fn(model, compile)
    # as generate_image_codes: on a CPU the step's linears run on weights packed for the run's rows
    with torch.no_grad(), packed_linears(model, 2 * GEN_BATCH):
        for label, grid in positions.items():
            new = torch.randint(0, model.num_image_tokens, (GEN_BATCH, 1), generator=generator).to(device)
            cache = _random_cache(model, new, grid - 1, generator)
            sampler = torch.Generator().manual_seed(grid)

            def step(new=new, grid=grid, cache=cache, sampler=sampler):
                cache.offset = model.text_len + grid - 1
                logits = decode(new, grid - 1, cache)
                logits = guide(logits[:GEN_BATCH], logits[GEN_BATCH:], COND_SCALE)
                return sample(filter_logits(logits, filter_thres=0.9), 1.0, sampler)

            times = []
            for _ in range(window + 1):  # the first is a warm-up (and compiles, the first time)
                times.append(timed(step, device)[0])
            first_ms.append(1000 * times[0])
            step_ms[label] = 1000 * statistics.median(times[1:])
            kv = counter.step_cache_values(GEN_BATCH, guided=True, token=grid)
            step_bytes[label] = weight_bytes + kv * torch.finfo(cache_dtype).bits / 8
            del cache
    flops = counter.generation_steps(GEN_BATCH, guided=True, cached=True)
    middle = positions["middle"]
    compiled = {"compile_s": (first_ms[0] - step_ms["start"]) / 1000} if compile is not None else {}
    return {"median_s": step_ms["middle"] / 1000, "min_s": None, "max_s": None, "repeats": window,
            "config": {**config, "batch": GEN_BATCH, "cond_scale": COND_SCALE, "precision": precision,
                       "compile": compile, "cache_dtype": str(cache_dtype).replace("torch.", ""),
                       "positions": positions},
            "prepare_s": prepare_s, **compiled, "ms_per_token_step": step_ms["middle"],
            "ms_step_window_start": step_ms["start"], "ms_step_window_end": step_ms["end"],
            "weight_bytes": weight_bytes, "kv_bytes": step_bytes["middle"] - weight_bytes, "rows": 2 * GEN_BATCH,
            "step_bytes": step_bytes["middle"], "step_bytes_window_start": step_bytes["start"],
            "step_bytes_window_end": step_bytes["end"], "step_matmul_flops": flops[middle],
            "step_matmul_flops_window_start": flops[positions["start"]],
            "step_matmul_flops_window_end": flops[positions["end"]],
            "memory_floor_formula": FLOOR_FORMULA, "flops_formula": model_flops.GENERATION_FORMULA,
            "ms_per_token_step_definition": "median of repeated cached steps at the middle image token (= the"
                                            " mean step, step time being linear in the position)"}  # fmt: skip


def registry(quick: bool) -> dict[str, tuple]:
    """name -> (function, params) of the lower-precision decoding measurements."""
    cases = {f"gen_quickstart_precision_{p}": (gen_precision, {"precision": p}) for p in PRECISIONS}
    # the compiled step, as generate_image_codes(compile=True) runs it; --quick only checks that it runs
    # (aot_eager: inductor's tuned compilation would take minutes even at the tiny size)
    backend = "aot_eager" if quick else "inductor"
    for p in PRECISIONS:
        cases[f"gen_quickstart_precision_{p}_compiled"] = (gen_precision, {"precision": p, "compile": backend})
    return cases
