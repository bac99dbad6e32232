"""The results store: SQLAlchemy 2.0 models, the session factory and query helpers.

Helpers in :mod:`sorter.db.queries` take a session and never commit; the
command, task or executor that opened the session owns the transaction.
"""
