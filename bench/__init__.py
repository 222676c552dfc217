"""Side-by-side benchmarks: each module runs both variants in one run and
prints the figures and their ratio (docs/benchmarks.md records them)."""
