"""Helpers shared by the test modules (fixtures live in conftest.py)."""
