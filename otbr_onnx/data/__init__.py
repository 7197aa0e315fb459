"""The data stage: the images every later stage reads, from one place.

``Images`` is what ``--data PATH`` loads (``images.load_images``: a folder of PNG/JPEG files, or
an ``.npz`` with ``x`` and optional ``y``), already in the model's input layout, size and value
range. Today only the ratio rule's fidelity check reads them (``ratio.reference_set``); a data
stage object feeding detection and removal as well is open work (issues 20-22).
"""

from otbr_onnx.data.images import Images, load_images

__all__ = ["Images", "load_images"]
