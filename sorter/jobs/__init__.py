"""Executors that run the classification pipeline: in-process (:mod:`sorter.jobs.local`) or a queue."""
