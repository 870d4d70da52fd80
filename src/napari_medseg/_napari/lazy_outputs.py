"""Results of images larger than memory: a zarr-backed Labels layer written as tiles finish.

An image layer whose data is a dask or zarr array, or a multiscale pyramid, may not fit in
memory, and neither would its outputs. Such an image is segmented into a zarr store in the
user's data folder (:func:`store_path`): the engine streams the outputs into it band by band
(:class:`~napari_medseg.engine.inference.sinks.ZarrSink`, the same writer as
``napari-medseg predict -o OUT.zarr``), and the mask is shown as a Labels layer whose data is
that store's array (:class:`LazyResult`): it appears once the plan is made and is refreshed as
slices and tiles finish, so a volume larger than memory is segmented from the widget without
ever being held whole. Running the same settings again resumes the store.

This module holds no numeric logic: it chooses the store, gives the engine its config, and
wires the store's array into a layer. What stays in memory-only for these images: the
threshold slider's re-thresholding (it needs the probabilities in memory), undo, and
editing the mask (the layer is read-only: it is the store).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.progress import FinishedEvent, PlaneEvent, PlanEvent, TilesEvent
from .result_layers import image_array, output_kwargs, output_name

#: The marker output of a store-backed mask layer (not the in-memory "mask").
STORE_OUTPUT = "mask (zarr)"

__all__ = ["LAZY_SUFFIX", "is_lazy", "store_path", "streaming_config", "LazyResult"]

#: The streamed mask layer is named like the in-memory one plus this.
LAZY_SUFFIX = " (zarr)"
#: Least seconds between two refreshes of the layer while tiles finish.
REFRESH_S = 0.5


def is_lazy(image_layer: Any) -> bool:
    """Whether an image layer's data is lazy (dask, zarr, a multiscale pyramid): its result
    is streamed into a store instead of held in memory."""
    if getattr(image_layer, "multiscale", False):
        return True
    return not isinstance(image_array(image_layer), np.ndarray)


def store_path(image_name: str, region: Any, settings_key: str = "") -> Path:
    """The store of one image's (region's) result in the user data folder: the same path
    for the same image, region and settings, so a re-run resumes it."""
    from ..resources import user_data_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", image_name)[:60] or "image"
    key = f"{image_name}|{tuple(region.start)}|{tuple(region.stop)}|{settings_key}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return user_data_dir() / "results" / f"{slug}-{digest}.zarr"


def streaming_config(config: Any, store: Path) -> Any:
    """The run's config writing into ``store`` (replacing another run's store, resuming the
    same run's)."""
    return config.replace(store=str(store), overwrite=True, resume=True)


def _settings_key(config: Any) -> str:
    import json

    return json.dumps(config.to_dict(), sort_keys=True, default=str)


class LazyResult:
    """The Labels layer of a streamed run: added when the store exists, refreshed as tiles
    finish.

    Args:
        viewer: the napari viewer.
        image_layer: the segmented image layer.
        store: the run's store (:func:`store_path`).
        region: the part of the image the run covers (its start places the layer).
    """

    def __init__(self, viewer: Any, image_layer: Any, store: Path, region: Any) -> None:
        self.viewer = viewer
        self.image_name = image_layer.name
        self.store = Path(store)
        self.region = region
        self.layer: Any = None
        self._last = 0.0

    @classmethod
    def for_run(cls, viewer: Any, image_layer: Any, region: Any, config: Any) -> LazyResult:
        """The streamed result of a run of ``config`` over ``region`` of ``image_layer``."""
        return cls(viewer, image_layer, store_path(image_layer.name, region,
                                                   _settings_key(config)), region)

    def config(self, config: Any) -> Any:
        """The run's config, streaming into this result's store."""
        return streaming_config(config, self.store)

    @property
    def name(self) -> str:
        """The layer's name: the mask's, marked as streamed."""
        return output_name(self.image_name, "mask") + LAZY_SUFFIX

    def _mask_array(self) -> Any:
        import zarr

        return zarr.open_group(str(self.store), mode="r")["mask"]

    def _attach(self) -> None:
        """Add (or point an earlier one at) the Labels layer reading the store's mask."""
        if self.image_name not in self.viewer.layers:
            return
        image = self.viewer.layers[self.image_name]
        data = self._mask_array()
        factor = max(1, int(data.shape[-1]) // int(self.region.shape[-1]))  # super-resolution
        # its own marker: the in-memory tools (boundary, instances, metrics, fine-tune) look
        # for "mask" and must not load a store larger than memory
        kwargs = output_kwargs(image, factor, STORE_OUTPUT)
        start = np.zeros(len(kwargs["scale"]))
        start[-len(self.region.start):] = self.region.start
        spacing = np.asarray(image.scale)[-len(start):]
        kwargs["translate"] = tuple(np.asarray(kwargs["translate"], float) + start * spacing)
        existing = self.name in self.viewer.layers and self.viewer.layers[self.name]
        if existing:
            existing.data = data
            existing.translate = kwargs["translate"]
            self.layer = existing
        else:
            self.layer = self.viewer.add_labels(data, name=self.name, opacity=0.5, **kwargs)
        self.layer.editable = False  # the store is the result; edits go to a copy (below)

    def on_event(self, event: Any) -> None:
        """Follow the run's events (on the GUI thread): the layer appears with the first
        plan, and is refreshed at most every :data:`REFRESH_S` seconds as tiles finish."""
        if isinstance(event, PlanEvent) and self.layer is None and self.store.is_dir():
            self._attach()
            return
        if self.layer is None or not isinstance(event, (TilesEvent, PlaneEvent, FinishedEvent)):
            return
        now = time.monotonic()
        if isinstance(event, (PlaneEvent, FinishedEvent)) or now - self._last >= REFRESH_S:
            self._last = now
            self.layer.refresh()

    def finish(self, result: Any) -> str:
        """The run ended: show the whole store and return a line for the status label."""
        if self.layer is None and self.store.is_dir():
            self._attach()
        if self.layer is not None:
            self.layer.refresh()
            self.viewer.layers.selection.active = self.layer
        done = len(getattr(result, "planes_done", ()) or ())
        if getattr(result, "cancelled", False):
            return (f"Cancelled: {done} slice(s) are kept in {self.store}; running again "
                    "resumes there.")
        return f"Done: the mask is streamed into {self.store} (layer {self.name!r})."
