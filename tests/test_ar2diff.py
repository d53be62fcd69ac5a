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
