"""Benchmarks: each module has main(argv) and writes JSON; run them as `tide bench <name> ...`."""
