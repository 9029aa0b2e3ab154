"""SAEBench through the real library (issue 18 item 2): see run.py (main side) and worker.py (its venv)."""
