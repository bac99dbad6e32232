"""The classifier: spec, network factory, shared preprocessing, artefact and inference."""
