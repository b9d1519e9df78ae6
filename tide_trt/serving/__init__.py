"""Serving: scheduler, Triton glue, server launcher."""
