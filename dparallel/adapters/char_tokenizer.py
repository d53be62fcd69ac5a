"""Character-level tokenizer of the embedded default, built with ``tokenizers`` and wrapped as a
``PreTrainedTokenizerFast`` so it saves, loads and applies chat templates like any Hugging Face tokenizer."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, MASK, EOS, BOS = "<|pad|>", "<|mask|>", "<|eos|>", "<|bos|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, MASK, EOS, BOS)
# Printable ASCII plus newline: everything the synthetic suite and simple custom prompts use.
CHARACTERS: str = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.ascii_letters + string.digits) <= set(CHARACTERS)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Ids 0-3 are pad, mask, eos, bos; then one id per character. Unknown characters raise at encode time."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(CHARACTERS)})
    # BPE with no merges is exactly a character-level model: every character is its own token.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        mask_token=MASK,
        eos_token=EOS,
        bos_token=BOS,
        padding_side="left",
        model_max_length=1024,
    )
