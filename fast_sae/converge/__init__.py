"""`pipeline.py converge`: the FAST vs BT comparison at convergence, with seeds and cross-evaluation.

plan.py lists the study's caches, training runs and evaluations as the public commands a user
could type (like the demo) and runs what is not done yet; aggregate.py reads the evaluations'
report.json files back into the study's tables and plots (converge.json, converge.md, PNGs).
"""
