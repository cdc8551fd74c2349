"""Helpers the tests and the benchmark share; nothing here needs Django or pytest."""
