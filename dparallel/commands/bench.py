"""``dparallel bench``: the sampler against the memory-bandwidth floor and against LLaDA's reference loop.

For each (batch, cache) the bench decodes one block after a ``context``-token prompt and reports: the time of one
decode forward (a block-only forward against the cache, or a full forward without one), the floor (the model's
weight bytes over the copy bandwidth measured on the same device in the same run), their ratio, the engine's
overhead outside model forwards, forwards/s, TPF and tokens/s, and the wall time per answer of the engine and of
the reference loop (``topk``, no cache, a full-sequence forward every step) at equal NFE: both run the
``topk`` schedule with ``steps`` forwards per block, EOS suppressed so every answer fills the block.
"""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf

from dparallel.adapters.base import ModelAdapter
from dparallel.commands.config import BenchConfig
from dparallel.commands.recipe import load_recipe, open_run_dir
from dparallel.core.io import atomic_write_json, atomic_write_text, save_recipe
from dparallel.core.runtime import weights_dtype
from dparallel.engine.cache import ContextCache
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder, build_canvas
from dparallel.engine.pipeline import load

# The benchmark shapes: the tiny family's architecture at a real model's sizes.
SHAPES = {
    "llada-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=12288, vocab_size=126464
    ),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, reps=5)
    return 2 * src.numel() / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_shape_adapter(shape: str, device: str) -> ModelAdapter:
    """The tiny family's Llama at ``shape``'s sizes with random bf16 weights: nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dparallel.adapters.base import SpecialIds
    from dparallel.adapters.char_tokenizer import build_char_tokenizer
    from dparallel.adapters.tiny import TinyAdapter

    config = LlamaConfig(
        **SHAPES[shape],
        num_key_value_heads=SHAPES[shape]["num_attention_heads"],
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = SpecialIds(mask=SHAPES[shape]["vocab_size"] - 1, eos=2, eot=2, pad=0)
    return TinyAdapter(model, build_char_tokenizer(), ids, name=f"{shape}-shape")


def _prompts(adapter: ModelAdapter, batch: int, context: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 90, (batch, context), generator=g).tolist()


def bench_row(adapter: ModelAdapter, cfg: BenchConfig, batch: int, cache: str, floor_ms: float) -> dict:
    device = adapter.device
    prompts = _prompts(adapter, batch, cfg.context)
    # Speed, not quality: EOS is suppressed so every answer fills its block, and both loops run `steps` forwards.
    common = dict(
        rule="topk", steps=cfg.steps, gen_length=cfg.block_length, block_length=cfg.block_length, logits_eos_inf=True
    )
    mode, _, variant = cache.partition("-")
    static = dict(static_cache=variant in ("static", "graph"), cuda_graph=variant == "graph")
    decode = DecodeConfig(cache=mode, **static, **common)
    canvas = build_canvas(prompts, cfg.block_length, adapter.ids.mask, adapter.ids.pad, device)
    lo, hi = canvas.prompt_width, canvas.prompt_width + cfg.block_length
    with torch.no_grad():
        if mode == "none":
            step_s = timed(lambda: adapter.logits(canvas.x, canvas.attention_mask), device, cfg.reps)
            refresh_s = step_s
        else:
            ctx = ContextCache(adapter, mode, static["static_cache"], static["cuda_graph"])
            ctx.refresh(canvas.x, canvas.attention_mask, lo, hi)  # allocates the static slots (and the graph)
            refresh_s = timed(lambda: ctx.refresh(canvas.x, canvas.attention_mask, lo, hi), device, cfg.reps)
            step_s = timed(lambda: ctx.step(canvas.x, canvas.attention_mask, lo, hi), device, cfg.reps)
    engine = Decoder(adapter, decode)
    engine.run(prompts)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    _, _, stats = engine.run(prompts)
    synchronize(device)
    engine_s = time.perf_counter() - start
    nfe = max(s.nfe for s in stats)
    forwards_s = refresh_s + (nfe - 1) * step_s
    reference = Decoder(adapter, DecodeConfig(**common))
    synchronize(device)
    start = time.perf_counter()
    reference.run(prompts)
    synchronize(device)
    reference_s = time.perf_counter() - start
    answer_tokens = sum(s.answer_tokens for s in stats)
    return {
        "model": adapter.name,
        "batch": batch,
        "cache": cache,
        "context": cfg.context,
        "block": cfg.block_length,
        "ms_per_forward": 1e3 * step_s,
        "floor_ms": floor_ms,
        "floor_ratio": 1e3 * step_s / floor_ms,
        # not clamped: a value below 0 says the forwards timed alone ran slower than inside the loop (noise, or
        # caches warmer in the loop), which a clamp to 0.00 would hide
        "overhead_frac": 1 - forwards_s / engine_s,
        "forwards_per_s": 1 / step_s,
        "nfe": nfe,
        "tpf": answer_tokens / (batch * nfe),
        "tokens_per_s": answer_tokens / engine_s,
        "engine_ms_per_answer": 1e3 * engine_s / batch,
        "reference_ms_per_answer": 1e3 * reference_s / batch,
        "speedup_vs_reference": reference_s / engine_s,
    }


def train_step_row(adapter: ModelAdapter, cfg: BenchConfig, recipe) -> dict:
    """One certainty-forcing step (forward over both complementary passes, backward, AdamW) of the student that
    ``recipe`` (a distill recipe) trains, on random tokens at ``cfg``'s shape: median step time, tokens/s, peak
    device memory and MFU. Model FLOPs per pass: a forward (2 N T) and a backward: activation gradients (2 N T),
    plus weight gradients (2 N T) in full fine-tuning only (LoRA's own are negligible): 2 passes x 4 (6) N T."""
    from dparallel.methods.base import apply_lora
    from dparallel.methods.distill import CertaintyForcingModule

    device = adapter.device
    if recipe.lora.enabled:
        apply_lora(adapter, recipe.lora)
    adapter.model.train()
    module = CertaintyForcingModule(recipe, adapter)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = {
        "prompt_ids": torch.randint(4, 90, (cfg.train_batch, cfg.train_prompt), generator=g).to(device),
        "tokens": torch.randint(4, 90, (cfg.train_batch, cfg.train_gen), generator=g).to(device),
        "attention_mask": torch.ones(cfg.train_batch, cfg.train_prompt + cfg.train_gen, dtype=torch.long).to(device),
        "draw": torch.arange(cfg.train_batch).to(device),
    }

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = module.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, max(2, cfg.reps // 4))
    tokens = cfg.train_batch * (cfg.train_prompt + cfg.train_gen)
    n = sum(p.numel() for p in adapter.model.parameters())
    flops = 2 * (4 if recipe.lora.enabled else 6) * n * tokens
    return {
        "model": adapter.name,
        "lora_r": recipe.lora.r if recipe.lora.enabled else None,
        "batch": cfg.train_batch,
        "seq": cfg.train_prompt + cfg.train_gen,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "mfu": flops / seconds / (cfg.peak_tflops * 1e12),
    }


def run_bench(adapter: ModelAdapter, cfg: BenchConfig, progress: bool = True) -> dict:
    """All rows plus the device and its measured copy bandwidth (the ``bench.json`` object)."""
    device = adapter.device
    bandwidth = copy_bandwidth(device, cfg.copy_mib)
    floor_ms = 1e3 * weight_bytes(adapter.model) / bandwidth
    rows = []
    for batch in cfg.batches:
        for cache in cfg.caches:
            row = bench_row(adapter, cfg, batch, cache, floor_ms)
            rows.append(row)
            if progress:
                print(
                    f"  batch {batch:>3} cache {cache:<6} {row['ms_per_forward']:8.2f} ms/forward "
                    f"({row['floor_ratio']:.2f}x floor)  {row['tokens_per_s']:9.1f} tok/s  "
                    f"{row['speedup_vs_reference']:.2f}x reference",
                    flush=True,
                )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "weight_gb": weight_bytes(adapter.model) / 1e9,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    head = (
        "| batch | cache | ms/forward | floor ms | ratio | overhead | forwards/s | TPF | tokens/s | engine ms "
        "| reference ms | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['batch']} | {r['cache']} | {r['ms_per_forward']:.2f} | {r['floor_ms']:.2f} | {r['floor_ratio']:.2f} "
        f"| {r['overhead_frac']:.2f} | {r['forwards_per_s']:.1f} | {r['tpf']:.2f} | {r['tokens_per_s']:.1f} "
        f"| {r['engine_ms_per_answer']:.1f} | {r['reference_ms_per_answer']:.1f} | {r['speedup_vs_reference']:.2f} |\n"
        for r in report["rows"]
    )


def bench(cfg: DictConfig) -> dict:
    """Run the recipe's bench section; write RUN_DIR/bench.json and RUN_DIR/bench.md."""
    from dparallel.commands.bench import markdown, random_shape_adapter, run_bench
    from dparallel.commands.config import BenchConfig
    from dparallel.core.runtime import pick_device

    run_dir = open_run_dir(cfg)
    save_recipe(cfg, run_dir)
    bench_cfg = BenchConfig(**OmegaConf.to_container(cfg.bench))
    if bench_cfg.shape:
        adapter = random_shape_adapter(bench_cfg.shape, pick_device(cfg.model.device))
    else:
        adapter = load(
            cfg.model.path,
            family=cfg.model.family,
            device=cfg.model.device,
            dtype=weights_dtype(cfg.model.dtype, cfg.model.device),
        ).adapter
    print(f"bench: {adapter.name} on {adapter.device}", flush=True)
    report = run_bench(adapter, bench_cfg)
    if bench_cfg.train_step:  # last: it wraps the model in LoRA
        from dparallel.commands.bench import train_step_row

        report["train_step"] = row = train_step_row(adapter, bench_cfg, load_recipe(bench_cfg.train_recipe))
        print(
            f"  train step {row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.3f}", flush=True
        )
    atomic_write_json(run_dir / "bench.json", report)
    atomic_write_text(run_dir / "bench.md", markdown(report))
    print(f"report: {run_dir / 'bench.json'}", flush=True)
    return report
