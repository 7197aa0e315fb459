"""The backdoor detectors: the protocols (``base``), the data-free maximum-margin scan
(``margin``) and the tests run beside it on the user's images (``inversion``). ``detect`` runs
and combines them; a new detector is one module here and one line in ``detect.DATA_DETECTORS``."""
