"""Archive adaptation (``sorter adapt``): learn the archive's look from its own header labels with
cross-fitting, and rank the instances whose header the rest of the archive contradicts."""
