"""bioimage.io's own check of a package, runnable where its library pair needs the mend.

``python -m napari_medseg.engine.export.check test model.zip`` is the ``bioimageio`` command
(bioimageio.core's command line, the same code and arguments) after
:func:`~.spec_compat.mend_spec`, which bioimageio.core 0.11 with bioimageio.spec 0.5.12 needs
under the newer pydantic installed here (2.14). :func:`test_package` runs the same test from
Python.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["test_package", "main"]


def test_package(path: str | Path, weight_format: str | None = None):
    """bioimage.io's test of a package (every weight format unless one is named): its
    validation summary, whose ``status`` is ``"passed"`` when the test tensors reproduce."""
    from .spec_compat import mend_spec

    mend_spec()
    from bioimageio.core import test_model

    return test_model(str(path), weight_format=weight_format)


def main(argv: list[str] | None = None) -> int:
    """The ``bioimageio`` command line with ``argv`` (default: this process's)."""
    from .spec_compat import mend_spec

    mend_spec()
    if argv is not None:
        sys.argv = ["bioimageio", *argv]
    from bioimageio.core.__main__ import main as bioimageio_main

    try:
        bioimageio_main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
