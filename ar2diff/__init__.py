"""dparallel.ar2diff."""
