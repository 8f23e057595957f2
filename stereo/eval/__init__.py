"""Evaluation: the one metric definition (metrics), benchmark protocols (benchmarks), the runner shared with
training validation (runner), pictures and tables (report), run comparison (compare)."""
