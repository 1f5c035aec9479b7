"""Settings every collected test needs, the package's doctests included (tests/conftest.py is not
loaded when only ``densenet_efficient/`` is collected, as ``pytest densenet_efficient/...`` does)."""

import os

# Every test and doctest simulates what it asks the planner: none reads a simulation an earlier run
# (or the user's own planner) stored on disk, nor writes one there. tests/models/test_planner_store.py
# turns storing on in tmp dirs.
os.environ["DENSENET_EFFICIENT_PLANNER_CACHE"] = "0"
