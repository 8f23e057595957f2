"""Evaluation: the one metric definition (metrics), benchmark protocols (benchmarks), the runner shared with
training validation (runner), run comparison (compare); the pictures and tables are stereo/pictures.py."""
