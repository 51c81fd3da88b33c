"""qbench.harness: the engine (suites, cells, runner, data, models, tracking, executors, CLI)."""

__version__ = "0.1.0"
