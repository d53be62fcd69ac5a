"""Attention masks of block diffusion over an AR model's positions (BD3-LM, Fast-dLLM v2, NBDiff, SDAR).

A sequence of length L is cut into blocks of ``block_size`` counted back from its end (``block_ids`` [L]; the
answer of a left-padded ``[prompt ⊕ answer]`` row starts on a block boundary when the block size divides the
answer length). Block ids increase with the position.

Training runs one forward over ``[x_t ⊕ x_0]`` (length 2L; both halves reuse positions 0..L-1):

- x_t (noisy) query in block b sees the x_t keys of block b and the x_0 keys of blocks < b;
- x_0 (clean) query sees the x_0 keys of blocks <= its own (block-causal), or of positions <= its own
  (``context_causal``, NBDiff: the clean half is then an ordinary AR model and can carry an AR loss);
- nothing sees across documents (``doc_ids``, packed sequences), nothing sees an invalid key (padding), and every
  query sees itself (a padding query with no valid key would otherwise give NaN through softmax over nothing).

Decoding runs one sequence: a query in a block that still holds mask tokens (the x_t rule) sees blocks <= its
own; a query in a finished block follows the x_0 rule. So the keys/values of finished blocks are exactly those of
the training-time clean half, and a cache of them is exact.

Masks are boolean, True = may attend, [B, 1, Q, K]: transformers 5 uses a 4D mask as given (sdpa/eager).
"""

from __future__ import annotations

import torch

from dparallel.core.errors import require


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    """[length] block id per position, blocks counted back from the sequence end: the last ``block_size``
    positions share the highest id, and the first block is partial when ``block_size`` does not divide ``length``.

    Aligned to the end because a decoding canvas ``[pad, prompt, G answer slots]`` with ``block_size | G`` then
    starts its answer on a block boundary, whatever the prompt width, and a model needs nothing but the sequence
    to know its blocks (training rows are laid out the same way, see ``data.sft``)."""
    require(block_size > 0, f"block_size={block_size} must be positive")
    pos = torch.arange(length, device=device)
    return (pos + (-length) % block_size) // block_size


def _same_doc(doc_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[B, L, L] True where query and key are in the same document (all True without ``doc_ids``)."""
    if doc_ids is None:
        return torch.ones(batch, length, length, dtype=torch.bool, device=device)
    return doc_ids[:, :, None] == doc_ids[:, None, :]


def training_mask(
    blocks: torch.Tensor,
    valid: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    context_causal: bool = False,
) -> torch.Tensor:
    """The [x_t ⊕ x_0] mask. blocks: [L] block ids; valid: [B, L] (1 = real token); doc_ids: [B, L] or None.
    Returns bool [B, 1, 2L, 2L]; rows/columns 0..L-1 are x_t, L..2L-1 are x_0."""
    B, L = valid.shape
    device = valid.device
    bq, bk = blocks[:, None], blocks[None, :]  # [L, 1], [1, L]
    pos = torch.arange(L, device=device)
    doc = _same_doc(doc_ids, B, L, device)  # [B, L, L]
    keys = valid.bool()[:, None, :]  # [B, 1, L]
    noisy_noisy = (bq == bk)[None] & doc & keys
    noisy_clean = (bk < bq)[None] & doc & keys
    clean_rule = (pos[None, :] <= pos[:, None]) if context_causal else (bk <= bq)
    clean_clean = clean_rule[None] & doc & keys
    none = torch.zeros_like(noisy_noisy)
    top = torch.cat([noisy_noisy, noisy_clean], dim=2)
    bottom = torch.cat([none, clean_clean], dim=2)
    mask = torch.cat([top, bottom], dim=1)  # [B, 2L, 2L]
    mask |= torch.eye(2 * L, dtype=torch.bool, device=device)[None]
    return mask[:, None]


def decode_mask(
    blocks: torch.Tensor,
    key_valid: torch.Tensor,
    noisy_query: torch.Tensor,
    q_start: int,
    context_causal: bool = False,
) -> torch.Tensor:
    """Mask of queries at positions [q_start, K) against keys at positions [0, K) of one canvas.

    blocks: [K] block ids; key_valid: [B, K]; noisy_query: [B, Q] True where the query's block still holds a mask
    token (it follows the x_t rule). Returns bool [B, 1, Q, K] with Q = K - q_start."""
    B, K = key_valid.shape
    device = key_valid.device
    pos = torch.arange(K, device=device)
    qpos = pos[q_start:]
    bq, bk = blocks[q_start:, None], blocks[None, :]  # [Q, 1], [1, K]
    block_causal = (bk <= bq)[None]  # [1, Q, K]
    clean = (pos[None, :] <= qpos[:, None])[None] if context_causal else block_causal
    rule = torch.where(noisy_query[:, :, None], block_causal, clean)  # [B, Q, K]
    mask = rule & key_valid.bool()[:, None, :]
    mask |= pos[None, None, :] == qpos[None, :, None]  # every query sees itself
    return mask[:, None]


def noisy_blocks(x: torch.Tensor, blocks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[B, L] True at positions whose block holds at least one ``mask_id`` token. x: [B, L]; blocks: [L]."""
    n_blocks = int(blocks.max()) + 1
    has_mask = torch.zeros(x.shape[0], n_blocks, dtype=torch.long, device=x.device)
    index = blocks[None, :].expand_as(x)
    has_mask.scatter_reduce_(1, index, (x == mask_id).long(), reduce="amax")
    return has_mask.gather(1, index).bool()
