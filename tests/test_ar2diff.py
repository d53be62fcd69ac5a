"""AR -> block diffusion: masks against brute-force definitions, exact block caching, the training loss per recipe
switch, and the `ar` -> `ar2diff` pipeline through export and a fresh process."""

import itertools

import pytest
import torch

from dparallel.ar2diff.masks import block_ids, decode_mask, noisy_blocks, training_mask
from dparallel.core.errors import DParallelError


# ---- masks ----------------------------------------------------------------------------------------------------
def brute_training(blocks, valid, docs, context_causal):
    B, L = valid.shape
    out = torch.zeros(B, 1, 2 * L, 2 * L, dtype=torch.bool)
    for b, qi, ki in itertools.product(range(B), range(2 * L), range(2 * L)):
        q, k = qi % L, ki % L
        q_clean, k_clean = qi >= L, ki >= L
        ok = bool(valid[b, k]) and docs[b][q] == docs[b][k]
        if not q_clean and not k_clean:
            ok = ok and blocks[q] == blocks[k]
        elif not q_clean and k_clean:
            ok = ok and blocks[k] < blocks[q]
        elif q_clean and not k_clean:
            ok = False
        else:
            ok = ok and (k <= q if context_causal else blocks[k] <= blocks[q])
        out[b, 0, qi, ki] = ok or qi == ki
    return out


def test_block_ids_count_blocks_back_from_the_end():
    assert block_ids(9, 2).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert block_ids(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("context_causal", [False, True])
def test_training_mask_equals_brute_force(context_causal):
    blocks = block_ids(7, 2)  # a partial first block, then blocks of 2
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]])  # row 1 packs two documents
    got = training_mask(blocks, valid, docs, context_causal)
    assert torch.equal(got, brute_training(blocks.tolist(), valid, docs.tolist(), context_causal))
    no_docs = training_mask(blocks, valid, None, context_causal)
    assert torch.equal(no_docs, brute_training(blocks.tolist(), valid, [[0] * 7] * 2, context_causal))


@pytest.mark.parametrize("context_causal", [False, True])
def test_decode_mask_equals_brute_force(context_causal):
    blocks = block_ids(8, 3)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    x = torch.tensor([[5, 6, 7, 8, 1, 9, 10, 4], [5, 6, 7, 8, 9, 10, 11, 4]])  # mask id 1; blocks 0,0,1,1,1,2,2,2
    noisy = noisy_blocks(x, blocks, 1)
    assert noisy.tolist() == [[False] * 2 + [True] * 3 + [False] * 3, [False] * 8]
    q_start = 3
    got = decode_mask(blocks, valid, noisy[:, q_start:], q_start, context_causal)
    want = torch.zeros(2, 1, 8 - q_start, 8, dtype=torch.bool)
    for b, q, k in itertools.product(range(2), range(q_start, 8), range(8)):
        if bool(noisy[b, q]) or not context_causal:
            ok = blocks[k] <= blocks[q]
        else:
            ok = k <= q
        want[b, 0, q - q_start, k] = (bool(ok) and bool(valid[b, k])) or q == k
    assert torch.equal(got, want)


# ---- the block family and its exact cache ---------------------------------------------------------------------
def block_adapter(block_size=4, context_causal=False, token_shift=True, seed=0):
    from conftest import tiny_shape
    from omegaconf import OmegaConf

    from dparallel.adapters.tiny import new_tiny_adapter
    from dparallel.ar2diff.family import BlockAdapter

    tiny = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=seed)
    tiny.model.config.dparallel_block = {
        "block_size": block_size,
        "context_causal": context_causal,
        "token_shift": token_shift,
    }
    return BlockAdapter(tiny.model.eval(), tiny.tokenizer, tiny.ids, name="random-block")


PROMPTS = ["copy: abc\n", "sort: zyxw\n"]


@pytest.mark.parametrize(
    "block_size,block_length,context_causal,token_shift",
    [(4, 4, False, True), (8, 4, False, True), (4, 4, True, True), (4, 2, True, False)],
)
def test_cached_block_decoding_gives_the_uncached_tokens(
    one_thread, block_size, block_length, context_causal, token_shift
):
    from dparallel.engine.pipeline import Pipeline

    gen = Pipeline(block_adapter(block_size, context_causal, token_shift))
    decode = dict(rule="confidence", threshold=0.3, gen_length=16, block_length=block_length)
    plain = gen.generate(PROMPTS, **decode)
    cached = gen.generate(PROMPTS, cache="block", **decode)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    assert [g.stats.nfe for g in cached] == [g.stats.nfe for g in plain]
    assert all(g.stats.nfe > 16 // block_length for g in plain)  # several steps per block: the cache is used


@pytest.mark.parametrize("context_causal,token_shift", [(False, True), (True, True), (False, False)])
def test_cached_logits_equal_full_forward_logits(one_thread, context_causal, token_shift):
    from dparallel.ar2diff.cache import BlockCache
    from dparallel.engine.decoder import build_canvas

    adapter = block_adapter(4, context_causal, token_shift)
    ids = adapter.encode(PROMPTS)
    canvas = build_canvas(ids, 12, adapter.ids.mask, adapter.ids.pad, "cpu")
    x, attn, P = canvas.x, canvas.attention_mask, canvas.prompt_width
    g = torch.Generator().manual_seed(0)
    cache = BlockCache(adapter)
    with torch.no_grad():
        for b in range(3):  # per block: a step with the block all masked, one half-filled, then fill it
            lo, hi = P + 4 * b, P + 4 * b + 4
            for fill in (0, 2, 4):
                if fill < 4:
                    got = cache.step(x, attn, lo, hi)
                    want = adapter.logits(x, attn)[:, lo:hi]
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                x[:, lo + fill - 2 * (fill > 0) : lo + fill] = torch.randint(10, 40, (2, 2 * (fill > 0)), generator=g)
    assert cache.cached == P + 8  # blocks 0 and 1 are finished and cached; block 2 was the last active one


def test_block_cache_forwards_only_the_live_rows(one_thread):
    from dparallel.ar2diff.cache import BlockCache
    from dparallel.engine.decoder import build_canvas

    adapter = block_adapter(4)
    canvas = build_canvas(adapter.encode([*PROMPTS, "reverse: ab\n"]), 12, adapter.ids.mask, adapter.ids.pad, "cpu")
    x, attn, P = canvas.x, canvas.attention_mask, canvas.prompt_width
    cache, forward, rows = BlockCache(adapter), adapter.forward_span, []
    adapter.forward_span = lambda x, *rest: rows.append(len(x)) or forward(x, *rest)
    with torch.no_grad():
        cache.step(x, attn, P, P + 4)  # block 0, every row masked
        x[1, P : P + 4] = 7  # row 1 finishes block 0 first
        x[2, P : P + 12] = torch.tensor([9, adapter.ids.eos] + [adapter.ids.eos] * 10)  # row 2 ends (EOS filled)
        got, want = cache.step(x, attn, P, P + 4), adapter.logits(x, attn)
        x[0, P : P + 4] = 8
        got_next = cache.step(x, attn, P + 4, P + 8)  # block 1: rows 0 and 1 go on, row 2 has ended
        want_next = adapter.logits(x, attn)
    assert rows == [3, 1, 2]
    torch.testing.assert_close(got[0], want[0, P : P + 4], atol=1e-5, rtol=0)
    assert not got[1:].any()  # rows with nothing to decode in the window get logits 0 (nothing is committed)
    torch.testing.assert_close(got_next[:2], want_next[:2, P + 4 : P + 8], atol=1e-5, rtol=0)
    assert not got_next[2].any() and cache.rows.tolist() == [0, 1]
    x[2, P + 4] = adapter.ids.mask  # a row that ended cannot come back: its keys/values are gone
    with pytest.raises(DParallelError, match="gained masks after it ended"):
        cache.step(x, attn, P + 4, P + 8)


# ---- the training module --------------------------------------------------------------------------------------
def module_and_batch(*overrides, block_size=4):
    from conftest import tiny_shape
    from omegaconf import OmegaConf

    from dparallel.adapters.tiny import new_tiny_adapter
    from dparallel.ar2diff.family import ARAdapter
    from dparallel.ar2diff.method import convert
    from dparallel.ar2diff.module import BlockDiffusionModule
    from dparallel.commands.recipe import load_recipe
    from dparallel.data.sft import SuiteBatches

    cfg = load_recipe(
        None, ["method=ar2diff", f"ar2diff.block_size={block_size}", "ar2diff.gen_lengths=[32]", *overrides]
    )
    tiny = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=0)
    parent = ARAdapter(tiny.model, tiny.tokenizer, ARAdapter.default_ids(tiny.tokenizer))
    adapter = convert(parent, block_size, cfg.ar2diff.context_causal, cfg.ar2diff.token_shift)
    batch = SuiteBatches(adapter.tokenizer, ["copy", "sort"], 3, [32], adapter.ids.eos, adapter.ids.pad).batch(0)
    return BlockDiffusionModule(cfg, adapter), batch


SWITCHES = {
    "fast-dllm-v2": ([], 4.573016),
    "single-copy": (["ar2diff.complementary=false"], 4.561246),
    "sdar": (["ar2diff.inverse_t_weight=true", "ar2diff.noise=sample", "ar2diff.token_shift=false"], 4.926562),
    "bd3lm": (["ar2diff.inverse_t_weight=true", "ar2diff.noise=sample"], 4.944294),
    "nbdiff": (["ar2diff.context_causal=true", "ar2diff.ar_loss_weight=0.5"], 6.872647),
    "efficient-dlm": (["ar2diff.token_shift=false", "ar2diff.position_slope=1.0"], 4.550550),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_loss_is_pinned_per_switch_set(one_thread, name):
    overrides, want = SWITCHES[name]
    module, batch = module_and_batch(*overrides)
    loss, parts = module.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()  # gradients flow through the [x_t ⊕ x_0] forward
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(want, abs=1e-4)


def test_block_size_one_with_token_shift_is_the_ar_loss(one_thread):
    """Curriculum stage 1 (block 1, complementary pair): every answer token is predicted once from the clean
    prefix, i.e. exactly the AR parent's next-token loss (the clean half's AR loss, computed separately)."""
    module, batch = module_and_batch(
        "ar2diff.curriculum=jump", "ar2diff.curriculum_steps=5", "ar2diff.context_causal=true"
    )
    loss, parts = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert parts["block_size"] == 1.0
    module.recipe.ar_loss_weight = 1.0
    _, with_ar = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(float(with_ar["ar_loss"]), abs=1e-5)


def test_complementary_copies_are_complements():
    from dparallel.ar2diff.config import Ar2DiffConfig
    from dparallel.ar2diff.masks import block_ids
    from dparallel.ar2diff.module import mask_probabilities, noisy_copies

    answer = torch.zeros(3, 12, dtype=torch.bool)
    answer[:, 4:] = True
    cfg = Ar2DiffConfig(block_size=4, gen_lengths=[8], position_slope=1.0)
    p = mask_probabilities(cfg, answer, block_ids(12, 4), 4, torch.Generator().manual_seed(0))
    (a, pa), (b, pb) = noisy_copies(torch.zeros(3, 12, dtype=torch.long), answer, p, torch.Generator().manual_seed(1))
    assert torch.equal(a ^ b, answer) and not (a & b).any()
    assert torch.all(p[:, :4] == 0) and torch.allclose((pa + pb)[answer], torch.ones(24), atol=1e-3)
    # position-dependent masking: within a block the probability rises with the index (same t per block)
    assert bool((p[:, 5] > p[:, 4]).all() and (p[:, 7] >= p[:, 6]).all())


def test_curriculum_grows_the_block_from_one():
    from dparallel.ar2diff.config import Ar2DiffConfig
    from dparallel.ar2diff.module import curriculum_block

    grow = Ar2DiffConfig(block_size=8, curriculum="grow", curriculum_steps=100)
    assert [curriculum_block(grow, s) for s in (0, 24, 25, 50, 75, 99, 100)] == [1, 1, 2, 4, 8, 8, 8]
    jump = Ar2DiffConfig(block_size=8, curriculum="jump", curriculum_steps=10)
    assert [curriculum_block(jump, s) for s in (0, 9, 10)] == [1, 1, 8]


@pytest.mark.parametrize("context_causal,token_shift", [(False, True), (True, False)])
def test_training_logits_of_a_block_equal_its_decoding_logits(one_thread, context_causal, token_shift):
    """What training supervises is what decoding sees: the x_t logits of block k in the [x_t ⊕ x_0] forward equal
    the logits of the same block decoded with blocks < k clean (the exact block cache's state)."""
    from dparallel.adapters.base import position_ids_from_mask
    from dparallel.ar2diff.masks import block_ids, training_mask

    module, batch = module_and_batch(
        f"ar2diff.context_causal={str(context_causal).lower()}", f"ar2diff.token_shift={str(token_shift).lower()}"
    )
    adapter, mask_id = module.adapter, module.adapter.ids.mask
    x, attn = batch["input_ids"], batch["attention_mask"]
    L = x.shape[1]
    blocks = block_ids(L, 4)
    noisy = x.clone()
    noisy[:, -32:][torch.rand(3, 32, generator=torch.Generator().manual_seed(0)) < 0.5] = mask_id
    pos = position_ids_from_mask(attn)
    with torch.no_grad():
        adapter.model.eval()
        out = adapter.model(
            input_ids=torch.cat([noisy, x], 1),
            attention_mask=training_mask(blocks, attn, None, context_causal),
            position_ids=torch.cat([pos, pos], 1),
        ).logits
        for k in range(4):  # the answer's blocks
            lo, hi = L - 16 + 4 * k, L - 16 + 4 * k + 4
            canvas = torch.cat([x[:, :lo], noisy[:, lo:hi], torch.full_like(x[:, hi:], mask_id)], 1)
            want = adapter.model(
                input_ids=canvas, attention_mask=adapter_mask(adapter, canvas, attn), position_ids=pos
            ).logits[:, lo:hi]
            torch.testing.assert_close(out[:, lo:hi], want, atol=1e-5, rtol=0)


def adapter_mask(adapter, x, attn):
    from dparallel.ar2diff.masks import block_ids, decode_mask, noisy_blocks

    blocks = block_ids(x.shape[1], adapter.block_size)
    return decode_mask(blocks, attn, noisy_blocks(x, blocks, adapter.ids.mask), 0, adapter.context_causal)


# ---- the ar -> ar2diff pipeline -------------------------------------------------------------------------------
TINY = ["tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2"]
STEPS = [
    "train.max_steps=2",
    "train.schedule_steps=1000",
    "train.global_batch_size=4",
    "train.log_every=1",
    "model.device=cpu",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    """A tiny AR parent trained from scratch for 2 steps, converted for 2 steps; both exported."""
    from dparallel.commands.export import export_run
    from dparallel.commands.recipe import load_recipe
    from dparallel.commands.train import train

    root = tmp_path_factory.mktemp("ar2diff")
    train(
        load_recipe(
            "recipes/tiny/ar.yaml",
            [f"run_dir={root / 'ar'}", "ar.init=scratch", "ar.gen_lengths=[32]", "ar.tasks=[copy,sort]", *TINY, *STEPS],
        )
    )
    overrides = [
        f"run_dir={root / 'block'}", f"model.path={root / 'ar' / 'model'}", "ar2diff.block_size=8",
        "ar2diff.gen_lengths=[32]", "ar2diff.tasks=[copy,sort]", "eval.after_train=false", "decode.gen_length=32",
        "decode.block_length=8", "ar2diff.parent_prompts=4", *STEPS,
    ]  # fmt: skip
    train(load_recipe("recipes/tiny/ar2diff.yaml", overrides))
    return export_run(root / "ar"), export_run(root / "block")


def test_pipeline_saves_an_ar_parent_and_a_block_model(pipeline):
    import json

    ar, block = pipeline
    assert json.loads((ar / "dparallel.json").read_text())["family"] == "ar"
    manifest = json.loads((block / "dparallel.json").read_text())
    assert (manifest["family"], manifest["method"], manifest["ids"]["mask"]) == ("block", "ar2diff", 1)
    config = json.loads((block / "config.json").read_text())
    assert config["dparallel_block"] == {"block_size": 8, "context_causal": True, "token_shift": True}
    assert config["architectures"] == ["LlamaForCausalLM"]  # a stock class, no remote code
    decoding = manifest["decoding"]
    assert (decoding["cache"], decoding["rule"], decoding["threshold"]) == ("block", "ltr", 0.95)


@pytest.mark.parametrize("which", ["ar", "block"])
def test_export_round_trip_in_a_fresh_process(pipeline, which):
    from conftest import fresh_process_tokens

    import dparallel

    folder = pipeline[0] if which == "ar" else pipeline[1]
    prompts = ["copy: ab\n", "sort: cba\n"]
    decode = dict(gen_length=16, block_length=8 if which == "block" else 16)
    before = [o.tokens for o in dparallel.load(str(folder), device="cpu").generate(prompts, **decode)]
    assert fresh_process_tokens(folder, prompts, **decode) == before


def test_ar_family_decodes_greedily_batched_like_unbatched(one_thread):
    from conftest import tiny_shape
    from omegaconf import OmegaConf

    from dparallel.adapters.tiny import new_tiny_adapter
    from dparallel.ar2diff.family import ARAdapter
    from dparallel.engine.pipeline import Pipeline

    tiny = new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=0)
    gen = Pipeline(ARAdapter(tiny.model.eval(), tiny.tokenizer, ARAdapter.default_ids(tiny.tokenizer)))
    prompts = ["copy: abc\n", "sort: zyxwvu\n"]
    both = gen.generate(prompts, gen_length=16, block_length=16)
    alone = [gen.generate([p], gen_length=16, block_length=16)[0] for p in prompts]
    assert [g.tokens for g in both] == [g.tokens for g in alone]
    # greedy by hand (full causal forwards, no cache) gives the same tokens as generate's KV cache
    x = torch.tensor(tiny.tokenizer([prompts[1]]).input_ids)
    with torch.no_grad():
        for _ in range(16):
            nxt = gen.adapter.model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
    row = both[1].tokens
    n = gen.adapter.answer_length(row)
    assert row[:n] == x[0, -16:].tolist()[:n]
    assert all(g.stats.nfe == g.stats.answer_tokens for g in both)  # one forward per token


def test_block_cache_refuses_other_families_and_misaligned_blocks(one_thread):
    from dparallel.engine.pipeline import Pipeline

    adapter = block_adapter(block_size=4)
    with pytest.raises(DParallelError, match="must divide the model's block_size=4"):
        Pipeline(adapter).generate(PROMPTS, rule="confidence", gen_length=16, block_length=8, cache="block")
    from conftest import tiny_shape
    from omegaconf import OmegaConf

    from dparallel.adapters.tiny import new_tiny_adapter

    tiny = Pipeline(new_tiny_adapter(OmegaConf.create(tiny_shape())))
    with pytest.raises(DParallelError, match="cache=block needs a converted block-diffusion model"):
        tiny.generate(PROMPTS, gen_length=16, block_length=8, cache="block")


def test_packed_documents_do_not_see_each_other(one_thread):
    from dparallel.ar2diff.masks import block_ids, training_mask
    from dparallel.ar2diff.module import document_positions

    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    module, batch = module_and_batch()
    x = batch["input_ids"][:1]
    L, half = x.shape[1], x.shape[1] // 2
    doc_ids = (torch.arange(L) >= half).long()[None]
    pos = document_positions(doc_ids)
    mask = training_mask(block_ids(L, 4), torch.ones_like(x), doc_ids)

    def doc1_logits(row):
        noisy = row.clone()
        noisy[:, half::2] = module.adapter.ids.mask
        with torch.no_grad():
            out = module.adapter.model(
                input_ids=torch.cat([noisy, row], 1), attention_mask=mask, position_ids=torch.cat([pos, pos], 1)
            ).logits
        return torch.cat([out[:, half:L], out[:, L + half :]], 1)

    edited = torch.cat([x[:, :half].flip(1), x[:, half:]], 1)  # document 0 changed, document 1 not
    torch.testing.assert_close(doc1_logits(edited), doc1_logits(x), atol=1e-5, rtol=0)
    packed = {"input_ids": x, "attention_mask": torch.ones_like(x), "prompt_mask": doc_ids == 0, "doc_ids": doc_ids}
    loss, _ = module.compute_loss(packed, torch.Generator().manual_seed(0))  # the module takes doc_ids too
    assert torch.isfinite(loss)


# ---- ar2diff.targets=parent ----------------------------------------------------------------------------------
def test_parent_targets_are_the_parents_verified_greedy_answers(one_thread):
    """Each pool prompt trains on the parent's greedy answer (decoded alone here, in batches of 64 there) when the
    suite's verifier accepts it, else on the data's; a shuffle's answer is the parent's, not the data's draw."""
    import dparallel
    from dparallel.adapters.load import load_adapter
    from dparallel.ar2diff.targets import parent_targets
    from dparallel.commands.recipe import load_recipe
    from dparallel.data.suite import is_correct, make_split

    overrides = ["ar2diff.targets=parent", "ar2diff.parent_prompts=3", "ar2diff.tasks=[copy,shuffle]"]
    cfg = load_recipe("recipes/tiny/ar2diff.yaml", overrides)
    items = parent_targets(load_adapter("builtin:tiny-ar", family="ar", dtype="float32"), cfg.ar2diff, seed=0)
    examples = make_split(["copy"], "train", 3, 0) + make_split(["shuffle"], "train", 3, 0)
    assert [it.prompt for it in items] == [e.prompt for e in examples]
    alone = dparallel.load("builtin:tiny-ar", device="cpu")
    for item, e in zip(items, examples):
        greedy = alone.generate([e.prompt], gen_length=32, block_length=32)[0].text
        assert item.answer == (greedy if is_correct(e.task, e.prompt, greedy) else e.answer)
    shuffles = [(it.answer, e.answer) for it, e in zip(items, examples) if e.task == "shuffle"]
    assert any(mine != data for mine, data in shuffles)


def test_unknown_targets_is_one_line(tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    args = ["train", "recipes/tiny/ar2diff.yaml", "ar2diff.targets=teacher", f"run_dir={tmp_path}"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "ar2diff.targets='teacher': choose from data, parent")
