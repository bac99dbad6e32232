"""Rules that act on verdicts: :mod:`~sorter.rules.spec` reads and checks a rules file,
:mod:`~sorter.rules.engine` matches classified instances against it and records what it did,
:mod:`~sorter.rules.filing` is the ``file`` action."""
