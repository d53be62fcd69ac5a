"""LLaDA and Dream checkpoints in stock transformers classes: tiny checkpoints written in each family's real naming
load through the weight maps, give the source model's logits (Dream's shifted), and decode with every cache."""

import json
import re

import pytest
import torch
from conftest import tiny_shape
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from dparallel.adapters.base import bidirectional_mask, position_ids_from_mask
from dparallel.adapters.char_tokenizer import build_char_tokenizer
from dparallel.adapters.load import load_adapter
from dparallel.adapters.stock import llada_llama_config
from dparallel.adapters.tiny import new_tiny_adapter
from dparallel.core.errors import DParallelError
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder

IDS = {"mask": 1, "eos": 2, "eot": 2, "pad": 0}
PROMPTS = ["copy: abc\n", "sum: 3 7 5\n", "reverse: hello\n"]


def llada_name(name: str) -> str:
    """Llama weight name -> LLaDA's (the inverse of LLADA_KEY_MAPPING)."""
    inverse = {
        r"^model\.embed_tokens\.": "model.transformer.wte.",
        r"^model\.norm\.": "model.transformer.ln_f.",
        r"^lm_head\.": "model.transformer.ff_out.",
        r"\.input_layernorm\.": ".attn_norm.",
        r"\.post_attention_layernorm\.": ".ff_norm.",
        r"\.self_attn\.o_proj\.": ".attn_out.",
        r"\.self_attn\.": ".",
        r"\.mlp\.gate_proj\.": ".ff_proj.",
        r"\.mlp\.up_proj\.": ".up_proj.",
        r"\.mlp\.down_proj\.": ".ff_out.",
        r"^model\.layers\.": "model.transformer.blocks.",
    }
    for pattern, repl in inverse.items():
        name = re.sub(pattern, repl, name)
    return name


def write_folder(folder, state: dict, config: dict, family: str) -> None:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "dparallel.json").write_text(json.dumps({"family": family, "ids": IDS}))
    build_char_tokenizer().save_pretrained(folder)


def bidirectional_logits(model, x):
    ones = torch.ones_like(x)
    with torch.no_grad():
        return model(
            input_ids=x, attention_mask=bidirectional_mask(ones), position_ids=position_ids_from_mask(ones)
        ).logits


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    """A random tiny Llama written as a LLaDA checkpoint (OLMo names, LLaDA's config.json); and the Llama."""
    source = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=3).model.eval()
    c = source.config
    config = {
        "model_type": "llada", "d_model": c.hidden_size, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers, "mlp_hidden_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "embedding_size": c.vocab_size, "max_sequence_length": 256,
        "rope_theta": 10000.0, "rms_norm_eps": c.rms_norm_eps, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "include_bias": False, "weight_tying": False, "rope": True, "alibi": False,
    }  # fmt: skip
    folder = tmp_path_factory.mktemp("llada") / "model"
    state = {llada_name(k): v for k, v in source.state_dict().items()}
    assert set(state) - {k for k in state if k.startswith("model.transformer.")} == set()
    write_folder(folder, state, config, "llada")
    return folder, source


def test_llada_checkpoint_loads_into_llama_with_the_source_logits(llada):
    folder, source = llada
    adapter = load_adapter(str(folder))
    assert type(adapter.model).__name__ == "LlamaForCausalLM" and adapter.family == "llada"
    assert {k: v.shape for k, v in adapter.model.state_dict().items()} == {
        k: v.shape for k, v in source.state_dict().items()
    }
    x = torch.tensor([adapter.tokenizer(PROMPTS[1]).input_ids + [1] * 8])
    assert torch.equal(adapter.logits(x), bidirectional_logits(source, x))
    assert adapter.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_llada_decodes_with_every_cache_and_a_refreshed_cache_is_exact(llada, cache):
    adapter = load_adapter(str(llada[0]))
    prompts = adapter.encode(PROMPTS)
    options = dict(rule="confidence", threshold=0.5, gen_length=16, block_length=8)
    exact = Decoder(adapter, DecodeConfig(**options)).run(prompts)[0]
    cached = Decoder(adapter, DecodeConfig(cache=cache, cache_refresh=1, **options)).run(prompts)[0]
    assert torch.equal(cached, exact)


def test_unsupported_llada_options_are_refused_in_one_line():
    with pytest.raises(DParallelError, match="sets weight_tying, scale_logits, which the stock Llama class"):
        llada_llama_config({"d_model": 8, "n_heads": 2, "n_layers": 1, "vocab_size": 8, "weight_tying": True,
                            "scale_logits": True})  # fmt: skip
    assert "model.family=llada-remote" in str(
        pytest.raises(DParallelError, llada_llama_config, {"alibi": True, "d_model": 8}).value
    )


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    """A random tiny Qwen2 written as a Dream checkpoint (Dream's config.json); and the Qwen2."""
    qwen = Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    torch.manual_seed(0)
    source = Qwen2ForCausalLM(qwen).eval()
    config = {k: v for k, v in qwen.to_dict().items() if k != "rope_parameters"}
    config.update(model_type="Dream", architectures=["DreamModel"], rope_theta=1e6, mask_token_id=1)
    folder = tmp_path_factory.mktemp("dream") / "model"
    write_folder(folder, source.state_dict(), config, "dream")
    return folder, source


def test_dream_checkpoint_loads_into_qwen2_with_shifted_logits(dream):
    folder, source = dream
    adapter = load_adapter(str(folder))
    assert type(adapter.model).__name__ == "Qwen2ForCausalLM" and adapter.shift_logits
    x = torch.tensor([adapter.tokenizer(PROMPTS[0]).input_ids + [1] * 6])
    raw = bidirectional_logits(source, x)
    aligned = adapter.logits(x)
    assert torch.equal(aligned[:, 1:], raw[:, :-1])  # position i-1 predicts token i
    assert torch.equal(aligned[:, 0], raw[:, 0])


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_dream_cached_step_starts_one_position_early_and_matches_the_full_forward(dream, mode):
    """Right after a refresh nothing has changed, so a cached step's window logits (and hidden states) equal the
    full forward's: the shifted window's first logit comes from the position before it."""
    from dparallel.engine.cache import ContextCache

    adapter = load_adapter(str(dream[0]))
    x = torch.tensor([adapter.tokenizer(PROMPTS[2]).input_ids + [1] * 16])
    attn, lo, hi = torch.ones_like(x), x.shape[1] - 16, x.shape[1] - 8
    cache = ContextCache(adapter, mode)
    with torch.no_grad(), adapter.capture_hidden() as captured:
        full = cache.refresh(x, attn, lo, hi)
        step = cache.step(x, attn, lo, hi)
    assert torch.allclose(step[:, : hi - lo], full[:, lo:hi], atol=1e-5)
    head = adapter.output_head()
    assert torch.allclose(head(captured.hidden[:, 1 : 1 + hi - lo]), step[:, : hi - lo], atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_decodes_with_every_cache_and_a_refreshed_cache_is_exact(dream, cache):
    adapter = load_adapter(str(dream[0]))
    prompts = adapter.encode(PROMPTS)
    options = dict(rule="confidence", threshold=0.5, gen_length=16, block_length=8)
    exact = Decoder(adapter, DecodeConfig(**options)).run(prompts)[0]
    cached = Decoder(adapter, DecodeConfig(cache=cache, cache_refresh=1, **options)).run(prompts)[0]
    assert torch.equal(cached, exact)


@pytest.mark.parametrize("family", ["tiny", "llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [dict(rule="topk", steps=8), dict(rule="confidence", threshold=0.3)])
def test_static_cache_path_equals_the_dynamic_path_token_for_token(llada, dream, family, cache, rule):
    """The StaticCache path (fixed shapes: a query rewrites its own slots, attends over all of them) holds the same
    keys as the dynamic cache, so it commits the same tokens in the same order (a block of 8 in a canvas of 16)."""
    folders = {"llada": llada[0], "dream": dream[0]}
    if family == "tiny":
        adapter = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=5)
        adapter.model.eval()
    else:
        adapter = load_adapter(str(folders[family]))
    prompts = adapter.encode(PROMPTS)
    options = dict(gen_length=16, block_length=8, cache=cache, **rule)
    dynamic = Decoder(adapter, DecodeConfig(**options)).run(prompts)
    adapter.prefill = adapter.extend = None  # the static run must not touch the dynamic cache's forwards
    static = Decoder(adapter, DecodeConfig(static_cache=True, **options)).run(prompts)
    assert torch.equal(static[0], dynamic[0]) and torch.equal(static[1], dynamic[1])


@pytest.mark.parametrize("rule", [dict(rule="confidence", threshold=0.001), dict(rule="entropy", threshold=4.7)])
def test_checking_block_ends_every_few_steps_changes_nothing_but_host_syncs(rule):
    """Blocks end after a few of their 8 steps here; checking only every 8th step runs the rest for nothing."""
    adapter = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=5)
    adapter.model.eval()
    prompts = adapter.encode(PROMPTS)
    options = dict(gen_length=16, block_length=8, cache="dual", static_cache=True, **rule)
    every, rarely = (Decoder(adapter, DecodeConfig(sync_every=n, **options)).run(prompts) for n in (1, 8))
    assert torch.equal(every[0], rarely[0]) and torch.equal(every[1], rarely[1])
    assert [s.nfe for s in every[2]] == [s.nfe for s in rarely[2]]
    assert max(s.nfe for s in every[2]) < 16  # blocks did end early, so the extra steps were exercised


def test_cuda_graph_needs_the_static_cache_and_a_gpu():
    with pytest.raises(DParallelError, match="cuda_graph=true replays the static cached step"):
        DecodeConfig(cache="dual", cuda_graph=True).validate()
    adapter = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=5)
    config = DecodeConfig(gen_length=16, block_length=8, cache="dual", static_cache=True, cuda_graph=True)
    with pytest.raises(DParallelError, match="cuda_graph=true needs a CUDA device"):
        Decoder(adapter, config).run(adapter.encode(PROMPTS))


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_graph_replay_equals_the_eager_static_step(cache):
    adapter = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=5)
    adapter.model.to("cuda").eval()
    prompts = adapter.encode(PROMPTS)
    options = dict(rule="confidence", threshold=0.3, gen_length=32, block_length=8, cache=cache, static_cache=True)
    eager = Decoder(adapter, DecodeConfig(**options)).run(prompts)
    graph = Decoder(adapter, DecodeConfig(cuda_graph=True, **options)).run(prompts)
    assert torch.equal(eager[0], graph[0]) and torch.equal(eager[1], graph[1])
