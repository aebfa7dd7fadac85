"""recalib: re-estimate BatchNorm statistics of a PyTorch model on a target-domain sample.

The shared, torch-free part: the contract models, the error hierarchy, the settings, the CLI and the
HTTP client. ``worker`` holds everything that touches torch; ``service`` is the HTTP API.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recalib")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
