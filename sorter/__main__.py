"""``python -m sorter``: the ``sorter`` command line."""

from sorter.cli import main

if __name__ == "__main__":
    main()
