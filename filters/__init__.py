"""dparallel.filters."""
