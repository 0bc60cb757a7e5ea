"""Benchmarks (not timed tests). ``make bench`` runs them all: ``python -m bench.run_all``."""
