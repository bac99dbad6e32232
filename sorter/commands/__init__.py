"""Click commands of ``sorter``, one module each."""
