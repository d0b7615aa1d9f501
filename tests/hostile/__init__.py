"""Hostile-input suite (issue 13); helpers in conftest.py."""
