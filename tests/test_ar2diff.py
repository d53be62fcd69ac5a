"""AR -> block diffusion: masks against brute-force definitions, exact block caching, the training loss per recipe
switch, and the `ar` -> `ar2diff` pipeline through export and a fresh process."""

import itertools

import pytest
import torch
from dparallel.ar2diff.masks import block_ids, decode_mask, noisy_blocks, training_mask


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
    from dparallel.ar2diff.family import BlockAdapter
    from omegaconf import OmegaConf

    from dparallel.tiny import new_tiny_adapter

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
    from dparallel.generator import Generator

    gen = Generator(block_adapter(block_size, context_causal, token_shift))
    decode = dict(rule="confidence", threshold=0.3, gen_length=16, block_length=block_length)
    plain = gen.generate(PROMPTS, **decode)
    cached = gen.generate(PROMPTS, cache="block", **decode)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    assert [g.stats.nfe for g in cached] == [g.stats.nfe for g in plain]
    assert all(g.stats.nfe > 16 // block_length for g in plain)  # several steps per block: the cache is used


@pytest.mark.parametrize("context_causal,token_shift", [(False, True), (True, True), (False, False)])
def test_cached_logits_equal_full_forward_logits(one_thread, context_causal, token_shift):
    from dparallel.ar2diff.cache import BlockCache

    from dparallel.engine.sampler import build_canvas

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
