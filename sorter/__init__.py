"""dicom-sorter: sort imaging archives by what the pixels show.

The Python API, for notebooks and scripts::

    from sorter import Classifier, classify_paths

    classifier = Classifier.load()            # the bundled model; Classifier.load(path) for another
    for record in classify_paths(["/archive/study1"], classifier):
        print(record["path"], record.get("label"), record.get("verdict") or record["reason"])

Imported lazily: the command line must not pay for the model runtime it may not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "__version__", "classify_paths"]

if TYPE_CHECKING:
    from sorter.classify import classify_paths
    from sorter.model.classifier import Classifier


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        from sorter.model.classifier import Classifier

        return Classifier
    if name == "classify_paths":
        from sorter.classify import classify_paths

        return classify_paths
    raise AttributeError(f"module 'sorter' has no attribute {name!r}")
