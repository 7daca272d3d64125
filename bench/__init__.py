"""Benchmarks: each module prints a table, writes JSON, and exposes run(quick) -> dict."""
