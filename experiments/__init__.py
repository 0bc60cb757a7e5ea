"""Experiments (not tests): runs that measure what the method does. See docs/EXPERIMENTS.md."""
