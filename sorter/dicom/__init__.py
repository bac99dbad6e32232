"""The DICOM reading layer: headers without pixels, pixels to grey float32 frames."""

from sorter.dicom.headers import header_from_dataset, read_header
from sorter.dicom.nonimage import non_image_reason
from sorter.dicom.pixels import DecodedImage, decode_dataset, load_image

__all__ = [
    "DecodedImage",
    "decode_dataset",
    "header_from_dataset",
    "load_image",
    "non_image_reason",
    "read_header",
]
