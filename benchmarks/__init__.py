"""Benchmarks for ollama_compact_server (run as scripts; see each module's docstring)."""
