"""Model adapters: the only place that knows a model family's quirks.

An adapter wraps a loaded model and its tokenizer and exposes one forward, ``logits(input_ids, attention_mask)``,
whose output ``[B, L, V]`` is aligned so that ``logits[:, i]`` predicts the token at position ``i`` (the logit
shift of Dream and of converted AR models is undone here), with bidirectional attention over the valid keys of
each row (left padding is masked out and positions restart at 0 on the first real token, so a batched row
decodes like the same row alone).

Families: ``tiny`` (a stock Llama class used bidirectionally; the embedded default), ``llada`` and ``dream``
(their checkpoints in stock Llama / Qwen2 classes, see :mod:`dparallel.stock`), ``llada-remote`` and
``dream-remote`` (their remote code, the fallback), ``hf-mlm`` (any ``AutoModelForMaskedLM``). Register a new one
with :func:`register_family`.
"""
