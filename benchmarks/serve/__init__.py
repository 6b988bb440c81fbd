"""Side-by-side serving benchmark of loraplex and vLLM's server: `python -m benchmarks.serve`."""
