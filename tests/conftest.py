"""Hypothesis profiles: CI derandomizes (the same examples on every run, so a red CI is
reproducible and never a coin flip); local runs explore new examples each time, which is how
the edge cases documented in the method tests were found."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
