"""Command-line tools on a finished run's artifacts, each a `main(argv) -> int` that pipeline/run.py routes to."""
