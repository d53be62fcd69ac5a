"""dparallel.data: the synthetic task suite, the character tokenizer, training batches, the trajectory format
(``trajectory``), prompt sources (``sources``), recording (``record``) and ``data inspect`` (``inspect``)."""
