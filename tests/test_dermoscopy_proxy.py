"""The out-of-device dermoscopy proxy (scripts/dermoscopy_proxy.py) on the shipped sample."""

from __future__ import annotations

import numpy as np
import tifffile

from napari_medseg.engine.checkpoints import resolve_weights
from napari_medseg.io.samples import load_sample
from script_modules import load_script


def test_the_proxy_gives_other_devices_photographs_and_scores_them(tmp_path):
    proxy = load_script("dermoscopy_proxy")
    image, _, mask = load_sample("dermoscopy")
    folder = tmp_path / "ph2_dermoscopy"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    tifffile.imwrite(folder / "images" / "IMD001.tif", np.asarray(image), photometric="rgb")
    tifffile.imwrite(folder / "masks" / "IMD001.tif", (np.asarray(mask) > 0).astype(np.uint8))
    folders = proxy.build_proxy(folder, ["IMD001"], tmp_path / "proxy", seed=0)
    assert sorted(folders) == sorted(["ph2", *proxy.DEVICES])
    h, w = np.asarray(image).shape[:2]
    for device, settings in proxy.DEVICES.items():
        img = tifffile.imread(folders[device] / "images" / "IMD001.tif")
        msk = tifffile.imread(folders[device] / "masks" / "IMD001.tif")
        assert img.shape[:2] == msk.shape and img.shape[2] == 3  # mask on the device's grid
        assert abs(img.shape[0] / h - settings["scale"]) < 0.1 * settings["scale"] + 0.01
        assert set(np.unique(msk)) <= {0, 1}
        # another camera: the colours differ from PH2's, the lesion stays
        assert abs(img.reshape(-1, 3).mean(0) - np.asarray(image).reshape(-1, 3).mean(0)).max() > 3
    model, _ = resolve_weights("sa2net_lite_ph2")
    result = proxy.score(model, folders, {"IMD001": "melanoma"})
    assert result["dice"]["ph2"] > 0.8 and 0 < result["dice"]["proxy"] <= 1
    assert result["gap_ph2_minus_proxy"] == round(result["dice"]["ph2"] -
                                                  result["dice"]["proxy"], 4)
    assert result["by_diagnosis"]["proxy/melanoma"]["n"] == len(proxy.DEVICES)
