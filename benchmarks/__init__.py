"""Benchmarks of arachne-mlflow side by side with the raw libraries and the alternatives a user would pick.

Run `python -m benchmarks` (full) or `python -m benchmarks --quick` (smoke run, used in CI).
"""
