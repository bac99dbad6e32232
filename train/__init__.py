"""Training pipeline for dicom-sorter: manifests, datasets, fitting, evaluation, calibration."""
