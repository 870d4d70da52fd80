"""The package version, read by the build backend and by ``napari_medseg.__version__``."""

__all__ = ["__version__"]

__version__ = "0.1.0"
