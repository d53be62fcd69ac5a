"""The lowest layer: errors, atomic writes, paths, the runtime (rank, device, dtype) and the registry."""
