"""dicom-sorter: sort imaging archives by what the pixels show."""

__version__ = "0.1.0"
