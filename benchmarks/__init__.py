"""lmplug benchmarks: ``python -m benchmarks [NAME ...] [--quick] [--json PATH]`` from the repo root.

Each benchmark is a module with ``NAME``, ``SUMMARY`` and ``run(settings) -> list[Result]``;
:mod:`benchmarks.harness` holds the shared sampling, table and JSON code, and
:mod:`benchmarks.cli` the command line. Missed targets are reported (MISS), never raised.
"""
