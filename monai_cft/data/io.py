"""Compatibility alias: the file and path helpers moved to :mod:`monai_cft.utils.io` (the bottom layer).

``from monai_cft.data.io import load_centerline`` keeps working for existing user code; the package
itself imports :mod:`monai_cft.utils.io`.
"""

from monai_cft.utils.io import *  # noqa: F401,F403
from monai_cft.utils.io import __all__  # noqa: F401
