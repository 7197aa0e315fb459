"""The data stage: the images every later stage reads, from one place.

``Images`` is what ``--data PATH`` loads (``images.load_images``: a folder of PNG/JPEG files, or
an ``.npz`` with ``x`` and optional ``y``), already in the model's input layout, size and value
range. ``DataSet`` (``stage.py``) adds what the stages need: the original model's own answers as
labels, and where the images came from (the user's, or synthesised from the model).
"""

from otbr_onnx.data.images import Images, load_images

__all__ = ["Images", "load_images"]
