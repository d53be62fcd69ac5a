"""dparallel.data: the synthetic task suite, the character tokenizer and training batches (and, in time, the
trajectory format and prompt sources)."""
