"""Open a synthetic CT (0.7 x 0.7 x 2.5 mm voxels) as NIfTI and as DICOM through the plugin's
reader, show it from the side, and save screenshots; print what was measured on them.

Run under a virtual X server (napari cannot draw an Image layer with QT_QPA_PLATFORM=offscreen):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_readers.py --out /tmp/shots

The phantom's body is an ellipsoid of semi-axes 0.9, 0.7 and 0.85 times the half-extents along
z, y and x, and its lesion a sphere. In a side view (rows = z, columns = x) the body's height /
width is 1.18 when the voxel size is honoured and about 0.33 when it is ignored (each slice drawn
one pixel thick); both are measured on the screenshots and printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

SHAPE = (40, 128, 128)  # z, y, x voxels
SPACING = (2.5, 0.7, 0.7)  # mm


def _body_aspect(shot: np.ndarray) -> float:
    """Height / width of the bright body in a screenshot (RGBA, rows x columns)."""
    grey = shot[..., :3].astype(float).mean(axis=-1)
    mask = grey > 40
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return float("nan")
    return float((rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/shots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QDialog, QLabel

    from napari_medseg._napari.reader import get_reader
    from napari_medseg.io.synthetic import ct_phantom, write_dicom_series, write_nifti_volume

    work = Path(tempfile.mkdtemp(prefix="medseg_shots_"))
    volume, _ = ct_phantom(SHAPE, SPACING)
    nifti = write_nifti_volume(work / "ct.nii.gz", volume, SPACING)
    dicom = work / "ct_dicom"
    write_dicom_series(dicom, volume, SPACING)

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    report: dict[str, object] = {"shape_zyx": SHAPE, "spacing_zyx_mm": SPACING}

    def settle() -> None:
        for _ in range(5):
            QApplication.processEvents()

    def shoot(name: str) -> np.ndarray:
        viewer.reset_view()
        settle()
        shot = viewer.screenshot(str(args.out / f"{name}.png"), canvas_only=True)
        report[f"{name}_body_height_over_width"] = round(_body_aspect(shot), 3)
        return shot

    # 1. NIfTI through the plugin's reader hook
    [ct] = viewer.open(str(nifti), plugin="napari-medseg")
    ct.contrast_limits = (-200, 300)
    report["nifti_layer_scale"] = [float(s) for s in ct.scale]
    shoot("nifti_axial")
    viewer.dims.order = (1, 0, 2)  # rows = z, columns = x: a coronal side view
    viewer.dims.set_point(1, float(ct.extent.world[1][1] / 2))
    shoot("nifti_side")
    viewer.layers.clear()

    # 2. the DICOM folder through get_reader directly (what napari calls)
    reader = get_reader(str(dicom))
    [(data, kwargs, kind)] = reader(str(dicom))
    layer = viewer._add_layer_from_data(data, kwargs, kind)[0]
    report["dicom_layer_scale"] = [float(s) for s in layer.scale]
    viewer.dims.order = (1, 0, 2)
    shoot("dicom_side")
    viewer.dims.ndisplay = 3  # a volume rendering seen along y (the order set above)
    layer.rendering = "mip"
    shoot("dicom_3d_side")
    angles = viewer.camera.angles
    viewer.camera.angles = (angles[0], angles[1] + 35, angles[2] + 20)  # an oblique look
    settle()
    viewer.screenshot(str(args.out / "dicom_3d_oblique.png"), canvas_only=True)
    viewer.dims.ndisplay = 2
    viewer.layers.clear()

    # 3. control: the same voxels without the spacing look squashed
    viewer.add_image(volume, name="no spacing (wrong)", contrast_limits=(-200, 300))
    viewer.dims.order = (1, 0, 2)
    shoot("control_without_scale_side")
    viewer.layers.clear()
    viewer.dims.order = (0, 1, 2)

    # 4. a damaged file: what a person sees (napari's reader dialog carries our sentence)
    from napari.settings import get_settings

    cut = work / "damaged.nii.gz"
    raw = nifti.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    settings = get_settings()
    previous = dict(settings.plugins.extension2reader)
    settings.plugins.extension2reader = {**previous, "*.nii.gz": "napari-medseg"}
    seen: dict[str, str] = {}

    def grab_dialog() -> None:
        for widget in QApplication.topLevelWidgets():
            if isinstance(widget, QDialog) and widget.isVisible():
                widget.grab().save(str(args.out / "damaged_file_dialog.png"))
                texts = [w.text() for w in widget.findChildren(QLabel) if w.text()]
                seen["dialog"] = " | ".join(texts)
                widget.reject()
                return
        QTimer.singleShot(200, grab_dialog)

    QTimer.singleShot(300, grab_dialog)
    try:
        viewer.window._qt_viewer._qt_open([str(cut)], stack=False)
    except Exception as exc:  # noqa: BLE001 - no other reader left: napari raises to its handler
        seen["raised"] = f"{type(exc).__name__}: {exc}"
    finally:
        settings.plugins.extension2reader = previous
    report["damaged_file"] = seen

    print(json.dumps(report, indent=2))
    from screenshot_journey import close_viewer

    close_viewer(viewer)


if __name__ == "__main__":
    main()
