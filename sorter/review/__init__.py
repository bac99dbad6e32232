"""Human review of discrepancies: the ``reviews`` table's store, the review page, its pictures."""
