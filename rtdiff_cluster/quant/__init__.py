"""Low-precision inference: FP8 linears (fp8.py) swapped into a loaded model in place."""
