"""What each CLI command does, given a resolved recipe; the recipe schema; evaluation, benchmarks, sweeps, export."""
