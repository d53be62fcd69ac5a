"""dparallel.samplers."""
