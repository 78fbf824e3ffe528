"""``chatkv bench``: measure what KV reuse and batching buy against plain transformers, in one run.

``cli.run_bench`` loads the model, runs the chosen scenarios (``scenarios/``, one file each) and
prints a table per scenario; ``report`` writes the tables, the JSON of the docs/contracts.md contract
comes from the same ``ScenarioResult`` objects, and ``plot`` draws the charts.
"""
