"""The one module that turns engine results into napari layers (and undoes it).

Output layers are named after the image: ``<image> mask`` (Labels), ``<image> boundary``
(Labels), ``<image> instances`` (Labels), ``<image> probabilities`` (Image: the foreground
of a one- or two-class network; ``<image> probabilities [class k]`` per class otherwise) and
``<image> TTA variance`` (Image), ``<image> tiles`` (Shapes, the tile plan). Each carries a marker in its
metadata (``OUTPUT_KEY``: the image's name and the output), and the marker, not the name,
finds it again: a renamed output keeps receiving runs, and a user's own layer that happens
to have the name (a sample's reference labels, say) is never written to; napari then gives
the new output a free name (``"<image> mask [1]"``). They always span the whole
image (times the network's output scale in-plane), with the image layer's scale, translate,
units, axis labels and affine, so that runs on single slices or visible regions accumulate
in the same layers. A re-run writes into the existing layers; every overwritten block is
copied first into a :class:`LayerChange` of the session's undo step, so a user's edits can
be brought back. Layer data are replaced in place and the layers refreshed; napari's own
paint history of a Labels layer is reset after such a write (it would otherwise undo into
stale pixels).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.inference.postprocess import dequantize_probabilities, offset_labels
from ..engine.inference.regions import Region, finished_keys, output_geometry, whole_region
from ..errors import InputShapeError
from ..io.metadata import upsampled_geometry
from .layers import META_KEY, meta_from_layer
from .session import Edit, ProbabilityCache, SegmentSession

__all__ = [
    "OUTPUT_KEY",
    "OUTPUT_SUFFIXES",
    "find_output",
    "is_output",
    "LayerChange",
    "output_name",
    "image_axes",
    "image_array",
    "image_shape",
    "output_kwargs",
    "apply_run",
    "apply_masks",
    "apply_array",
    "undo",
    "draw_tiles",
    "owned_layer_names",
    "style_labels",
]

#: Metadata key marking an output layer: ``{"image": <image name>, "output": <output>}``.
OUTPUT_KEY = "napari_medseg_output"
#: Layer name suffix of each output.
OUTPUT_SUFFIXES = {
    "mask": "mask",
    "boundary": "boundary",
    "instances": "instances",
    "probabilities": "probabilities",
    "variance": "TTA variance",
    "tiles": "tiles",
}
_LABEL_OUTPUTS = ("mask", "boundary", "instances")
_CLEAR = (0.0, 0.0, 0.0, 0.0)
#: Colours of the label outputs, each its own: the mask's classes cyan, orange, green...
#: (a translucent fill), the boundary a magenta line drawn opaque over it, instances
#: napari's random colours.
_OUTPUT_COLORS = {
    "mask": {None: (0.95, 0.95, 0.3, 1.0), 0: _CLEAR, 1: (0.0, 0.85, 1.0, 1.0),
             2: (1.0, 0.55, 0.0, 1.0), 3: (0.35, 1.0, 0.35, 1.0), 4: (0.6, 0.4, 1.0, 1.0)},
    "boundary": {None: (1.0, 0.2, 0.85, 1.0), 0: _CLEAR, 1: (1.0, 0.2, 0.85, 1.0)},
}
_OUTPUT_OPACITY = {"mask": 0.4, "boundary": 1.0, "instances": 0.5}


def style_labels(layer: Any, output: str) -> None:
    """Give a Labels layer holding ``output`` (mask, boundary, instances) its colours and
    opacity, so that no output hides another (used for a run's layers and for the files
    the demo window opens)."""
    colors = _OUTPUT_COLORS.get(output)
    if colors is not None:
        from napari.utils.colormaps import DirectLabelColormap

        layer.colormap = DirectLabelColormap(color_dict=colors)
    layer.opacity = _OUTPUT_OPACITY.get(output, 0.5)


@dataclass
class LayerChange:
    """What one write did to a layer, enough to undo it.

    Attributes:
        layer: the layer.
        key: the index written (None when the whole data was set or the layer created).
        previous: the data there before (None for a created layer).
        created: the layer did not exist before.
    """

    layer: Any
    key: tuple | None
    previous: np.ndarray | None
    created: bool = False

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshot."""
        return 0 if self.previous is None else int(self.previous.nbytes)


def output_name(image_name: str, output: str) -> str:
    """``"cells"``, ``"mask"`` -> ``"cells mask"``; ``"probabilities[2]"`` -> ``"cells
    probabilities [class 2]"`` (one layer per class of a several-class network)."""
    if output.startswith("probabilities[") and output.endswith("]"):
        return f"{image_name} probabilities [class {output[len('probabilities['):-1]}]"
    return f"{image_name} {OUTPUT_SUFFIXES[output]}"


def is_output(layer: Any, image_name: str | None = None) -> bool:
    """True for an output layer (of ``image_name``, when given)."""
    mark = (getattr(layer, "metadata", None) or {}).get(OUTPUT_KEY)
    if not isinstance(mark, dict):
        return False
    return image_name is None or mark.get("image") == image_name


def find_output(viewer: Any, image_name: str, output: str) -> Any:
    """The output layer of an image (by its marker), or None."""
    for layer in viewer.layers:
        mark = (getattr(layer, "metadata", None) or {}).get(OUTPUT_KEY)
        if isinstance(mark, dict) and mark.get("image") == image_name and (
                mark.get("output") == output):
            return layer
    return None


def owned_layer_names(viewer: Any, image_name: str) -> set[str]:
    """Names of the output layers of an image now in the viewer."""
    return {layer.name for layer in viewer.layers if is_output(layer, image_name)}


def image_axes(layer: Any) -> str:
    """The axes of an image layer's data (``YX``, ``ZYX``, ``YXC`` for RGB ...).

    Read from the metadata the napari-medseg reader stored, else guessed from the number of
    dimensions (``YX``, ``ZYX``, ``TZYX``).

    Raises:
        InputShapeError: the layer has more dimensions than can be told apart.
    """
    try:
        return meta_from_layer(layer).axes
    except (ValueError, TypeError):
        raise InputShapeError(
            f"Cannot tell the axes of the {layer.ndim}-D layer {layer.name!r}; "
            "napari-medseg segments YX, ZYX and TZYX images (RGB too).") from None


def image_array(layer: Any) -> Any:
    """The full-resolution data of an image layer (level 0 of a pyramid)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def pixel_meta(layer: Any) -> Any:
    """The axes and pixel size of an image layer (its scale and units, or what the reader
    stored) as an ``ImageMeta`` for the engine, which resamples each plane to the pixel size
    the weights declare; None when the axes cannot be told. Only geometry: no reader facts
    about the whole file ride along with a crop of it."""
    from ..io.metadata import ImageMeta

    try:
        meta = meta_from_layer(layer)
    except (ValueError, TypeError):
        return None
    return ImageMeta(axes=meta.axes, spacing=meta.spacing, units=meta.units, rgb=meta.rgb)


def image_shape(layer: Any) -> tuple[int, ...]:
    """The non-channel shape of an image layer (what its outputs span at scale 1)."""
    shape = tuple(int(s) for s in image_array(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def output_kwargs(image_layer: Any, factor: int = 1,
                  output: str | None = None) -> dict[str, Any]:
    """Geometry arguments of an output layer of ``image_layer``.

    Args:
        image_layer: the segmented image.
        factor: output side / input side in-plane (2 for a super-resolving network).
        output: the output's name, stored in the layer's marker.
    """
    scale, translate = output_geometry(image_layer.scale, image_layer.translate, factor)
    kwargs: dict[str, Any] = {"scale": scale, "translate": translate}
    labels = tuple(getattr(image_layer, "axis_labels", ()) or ())
    if len(labels) == len(scale):
        kwargs["axis_labels"] = labels
    units = getattr(image_layer, "units", None)
    if units is not None and len(tuple(units)) == len(scale):
        kwargs["units"] = tuple(str(u) for u in units)
    affine = np.asarray(image_layer.affine.affine_matrix)
    if not np.allclose(affine, np.eye(affine.shape[0])):
        kwargs["affine"] = affine
    metadata: dict[str, Any] = {}
    if output is not None:
        metadata[OUTPUT_KEY] = {"image": image_layer.name, "output": output}
    kwargs["metadata"] = metadata
    try:
        meta = meta_from_layer(image_layer).without_channels()
        if factor != 1 and meta.spacing:
            factors = (1,) * (len(meta.spacing) - 2) + (factor, factor)
            spacing, origin = upsampled_geometry(meta.spacing, meta.origin, factors)
            meta = meta.replace(spacing=spacing, origin=origin, affine=None)
        metadata[META_KEY] = meta
    except (ValueError, TypeError):
        pass
    return kwargs


def _ensure(viewer: Any, image_layer: Any, output: str, shape: Sequence[int], dtype: Any,
            factor: int, changes: list[LayerChange], created: Sequence[Any] = ()) -> Any:
    """The output layer, created (full of zeros) or re-shaped when it does not fit.

    A layer in ``created`` was made empty for this step by :func:`create_missing_outputs`:
    it is recorded as created (undoing the step removes it).
    """
    name = output_name(image_layer.name, output)
    shape = tuple(int(s) for s in shape)
    kwargs = output_kwargs(image_layer, factor, output)
    layer = find_output(viewer, image_layer.name, output)
    if layer is not None:
        data = layer.data
        if tuple(np.shape(data)) == shape and isinstance(data, np.ndarray) and (
                data.flags.writeable):
            if any(layer is c for c in created):
                changes.append(LayerChange(layer, None, None, created=True))
            return layer
        changes.append(LayerChange(layer, None, np.asarray(data).copy()))
        layer.data = np.zeros(shape, dtype)
        for attr in ("scale", "translate"):
            setattr(layer, attr, kwargs[attr])
        return layer
    data = np.zeros(shape, dtype)
    if output in _LABEL_OUTPUTS:
        layer = viewer.add_labels(data, name=name, **kwargs)
        style_labels(layer, output)
    else:
        if output == "variance":
            layer = viewer.add_image(data, name=name, colormap="magma", blending="additive",
                                     contrast_limits=(0.0, 0.1), **kwargs)
        else:
            layer = viewer.add_image(data, name=name, colormap="viridis", opacity=0.6,
                                     blending="translucent", contrast_limits=(0.0, 1.0),
                                     **kwargs)
    changes.append(LayerChange(layer, None, None, created=True))
    return layer


def _write(layer: Any, key: tuple, values: np.ndarray, changes: list[LayerChange]) -> None:
    """Write ``values`` at ``key``, copying what was there first (unless the same step
    created the layer: undoing it removes the layer)."""
    data = layer.data
    if not any(c.created and c.layer is layer for c in changes):
        changes.append(LayerChange(layer, key, np.array(data[key], copy=True)))
    data[key] = values


def _reset_paint_history(layer: Any) -> None:
    """Drop napari's paint history of a Labels layer whose data we rewrote.

    Its undo would otherwise put pre-run pixels back into the new data. napari drops the
    history when a layer stops being editable; the mode the user was in is kept.
    """
    from napari.layers import Labels

    if not isinstance(layer, Labels) or not layer.editable:
        return
    mode = layer.mode
    layer.editable = False
    layer.editable = True
    layer.mode = mode


def _refresh(layers: Sequence[Any]) -> None:
    for layer in layers:
        _reset_paint_history(layer)
        layer.refresh()


_PREWARM_MODULES = (
    # What napari imports the first time a Labels or Image layer is built and shown (about
    # a second of imports on a 2-core machine: pandas for layer features, the vispy visuals
    # and the layer controls; napari's own colour code, imported with them and by the Labels
    # layer built below, pulls in the numeric libraries it uses for the label colours).
    "pandas", "napari.utils.colormaps.colormap_utils",
    "napari._vispy.layers.labels", "napari._vispy.layers.image",
    "napari._vispy.overlays.labels_polygon",
    "napari._qt.layer_controls.qt_labels_controls",
    "napari._qt.layer_controls.qt_image_controls",
)
_prewarm_started = threading.Event()


def prewarm_layer_code() -> threading.Thread | None:
    """Import, in a background thread, the code napari runs when the first output layers
    appear, so that this one-off cost does not freeze the viewer at the end of the first
    run. Starts once per process; returns the thread (None when already started)."""
    if _prewarm_started.is_set():
        return None
    _prewarm_started.set()
    # pint builds its unit registry lazily on first use, and not thread-safely: a layer made
    # in the thread below while the viewer makes its first image layer left one of them
    # without the unit "pixel" (UndefinedUnitError). Built here first, in the caller's
    # thread; every layer needs it, so the first image would pay the same moments.
    try:
        import pint  # napari's units (a dependency of napari's, not ours)
    except ImportError:
        pass
    else:
        pint.get_application_registry().pixel  # noqa: B018 - the access builds the registry

    def work() -> None:
        import importlib

        for name in _PREWARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - private napari paths may move; only a warm-up
                pass
        try:  # the layer models themselves (no Qt): colormaps and feature tables
            from napari.layers import Labels

            Labels(np.zeros((2, 2), np.uint8))
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=work, name="napari-medseg-prewarm", daemon=True)
    thread.start()
    return thread


def _result_keys(result: Any) -> list[tuple]:
    """The parts of a result's mask to write: all of it, or the finished slices of a
    cancelled run (possibly none)."""
    mask = result["mask"]
    stack_axes = result.plan.stack_axes if result.plan is not None else ""
    if result.cancelled:
        return finished_keys(result.axes["mask"], mask.shape, stack_axes, result.planes_done)
    return [(slice(None),) * len(mask.shape)]


def _run_outputs(result: Any, show_probabilities: bool, show_variance: bool) -> list[tuple]:
    """``(output, dtype)`` of the layers a result is written into, images first (so that
    the label layers are drawn over them)."""
    outputs: list[tuple] = []
    if "probabilities" in result and show_probabilities:
        # One 2D/3D layer per foreground class (no extra "class" axis in the viewer): the
        # foreground of a one- or two-class network, else each class 1..K-1.
        k_all = int(result["probabilities"].shape[0])
        if k_all <= 2:
            outputs.append(("probabilities", np.float32))
        else:
            outputs += [(f"probabilities[{k}]", np.float32) for k in range(1, k_all)]
    if "variance" in result and show_variance:
        outputs.append(("variance", np.float32))
    outputs += [(o, result[o].dtype) for o in _LABEL_OUTPUTS if o in result]
    return outputs


def create_missing_outputs(viewer: Any, image_layer: Any, result: Any,
                           show_probabilities: bool, show_variance: bool) -> Iterator[Any]:
    """Create, empty, the output layers that writing ``result`` needs and that do not
    exist yet: one layer per ``next()``.

    napari needs a few hundred milliseconds of the GUI thread to add a layer (its visual,
    overlays and controls); a caller that steps this generator from the event loop (one
    layer per turn) keeps each stall to one layer's. Pass the layers to :func:`apply_run`
    as ``created`` so that undoing the run removes them.
    """
    if not _result_keys(result):
        return
    factor = int(result.scale)
    full_out = whole_region(image_shape(image_layer)).output(factor).shape
    for output, dtype in _run_outputs(result, show_probabilities, show_variance):
        if find_output(viewer, image_layer.name, output) is None:
            yield _ensure(viewer, image_layer, output, full_out, dtype, factor, [])


def apply_run(
    viewer: Any,
    image_layer: Any,
    result: Any,
    region: Region,
    session: SegmentSession,
    show_probabilities: bool,
    show_variance: bool,
    has_boundary_head: bool = False,
    created: Sequence[Any] = (),
    keep_painted: bool = False,
) -> Edit:
    """Write a prediction into the image's output layers and record the undo step.

    Pixels of a label output that differ from what the network last wrote there are the
    user's painting: counted in ``edit.painted`` (mask pixels), and kept with
    ``keep_painted`` (the re-run after fine-tuning on those very corrections).

    Args:
        viewer: the napari viewer.
        image_layer: the segmented image.
        result: the engine's ``PredictionResult`` for ``region`` of the image.
        region: the part of the image (non-channel axes) that was predicted.
        session: the widget's session (probability cache, undo stack).
        show_probabilities: add or update the probabilities layer.
        show_variance: add or update the TTA variance layer.
        has_boundary_head: the network predicts its own boundary (a new threshold then
            leaves the boundary layer alone).
        created: output layers made empty for this run (:func:`create_missing_outputs`).
        keep_painted: keep the user's painting in the label outputs.

    Returns:
        The recorded undo step (already pushed on the session; empty, and not pushed, when
        a cancelled run finished no slice).
    """
    factor = int(result.scale)
    full_out = whole_region(image_shape(image_layer)).output(factor).shape
    out_region = region.output(factor)
    axes = result.axes["mask"]
    keys = _result_keys(result)
    edit = Edit("run", image=image_layer.name, kept_painted=keep_painted)
    if not keys:  # cancelled before any slice finished: nothing to write
        return edit
    touched = []
    num_classes = int(result["probabilities"].shape[0]) if "probabilities" in result else None
    for output, dtype in _run_outputs(result, show_probabilities, show_variance):
        layer = _ensure(viewer, image_layer, output, full_out, dtype, factor, edit.changes,
                        created)
        # a layer made or emptied by this run holds no painting (the record is of old data)
        fresh = any(c.layer is layer and (c.created or c.key is None) for c in edit.changes)
        # objects of a part of the image are numbered after those already in the layer
        offset = 0 if fresh or output != "instances" or out_region.shape == tuple(
            full_out) else int(np.max(layer.data, initial=0))
        for key in keys:
            if output.startswith("probabilities"):
                k = num_classes - 1 if num_classes <= 2 else int(output[14:-1])
                values = dequantize_probabilities(result["probabilities"][(k,) + key])
            elif output == "variance":
                values = np.asarray(result["variance"][key], np.float32)
            else:
                values = np.asarray(result[output][key])
                if offset:
                    values = offset_labels(values, offset)
            out_key = out_region.offset(key)
            if output in _LABEL_OUTPUTS:
                predicted = values
                painted = None if fresh else session.painted_pixels(
                    image_layer.name, output, layer.data, out_key)
                if painted is not None and painted.any():
                    if output == "mask":
                        edit.painted += int(painted.sum())
                    if keep_painted:
                        values = np.where(painted, np.asarray(layer.data[out_key]), values)
                session.remember_prediction(image_layer.name, output, tuple(layer.data.shape),
                                            out_key, predicted, edit)
            _write(layer, out_key, values, edit.changes)
        touched.append(layer)
    if num_classes == 1:
        session.update_cache(image_layer.name, full_out, axes, 1, has_boundary_head,
                             out_region, result["probabilities"], keys, edit)
    session.last_region[image_layer.name] = out_region
    session.push(edit)
    _refresh(touched)
    return edit


def apply_masks(
    viewer: Any,
    image_layer: Any,
    blocks: Sequence[tuple[tuple, np.ndarray, np.ndarray | None]],
    session: SegmentSession,
    label: str,
) -> Edit:
    """Write re-thresholded masks (and derived boundaries) into the output layers.

    Args:
        viewer: the napari viewer.
        image_layer: the image the outputs belong to.
        blocks: ``(index, mask, boundary or None)`` as ``SegmentSession.rethreshold`` gives.
        session: the session (the undo step is pushed on it).
        label: name of the undo step.
    """
    edit = Edit(label, image=None)
    cache: ProbabilityCache | None = session.cache_for(image_layer.name)
    touched = []
    for output, pos in (("mask", 1), ("boundary", 2)):
        layer = find_output(viewer, image_layer.name, output)
        if layer is None:
            continue
        if cache is not None and tuple(np.shape(layer.data)) != cache.out_shape:
            continue  # the user replaced the layer's data; leave it alone
        wrote = False
        for block in blocks:
            values = block[pos]
            if values is None:
                continue
            _write(layer, block[0], values, edit.changes)
            session.remember_prediction(image_layer.name, output, tuple(layer.data.shape),
                                        block[0], np.asarray(values), edit)
            wrote = True
        if wrote:
            touched.append(layer)
    session.push(edit)
    _refresh(touched)
    return edit


def apply_array(
    viewer: Any,
    image_layer: Any,
    output: str,
    data: np.ndarray,
    session: SegmentSession,
    label: str,
) -> Edit:
    """Replace a whole output layer (boundary from mask, instances) as one undoable step.

    Args:
        viewer: the napari viewer.
        image_layer: the image the output belongs to.
        output: ``"boundary"`` or ``"instances"``.
        data: the new layer data (the label outputs' shape).
        session: the session (the undo step is pushed on it).
        label: name of the undo step.
    """
    edit = Edit(label)
    factor = max(1, int(round(data.shape[-1] / max(1, image_shape(image_layer)[-1]))))
    layer = _ensure(viewer, image_layer, output, data.shape, data.dtype, factor, edit.changes)
    _write(layer, (slice(None),) * data.ndim, data, edit.changes)
    session.remember_prediction(image_layer.name, output, tuple(data.shape),
                                (slice(None),) * data.ndim, np.asarray(data), edit)
    session.push(edit)
    _refresh([layer])
    return edit


def undo(viewer: Any, edit: Edit) -> list[str]:
    """Restore the layers an undo step changed (removing the layers it created).

    Returns:
        Names of the layers restored or removed.
    """
    names: list[str] = []
    touched: dict[int, Any] = {}
    for change in reversed(edit.changes):
        layer = change.layer
        if layer not in viewer.layers:
            continue
        if layer.name not in names:
            names.append(layer.name)
        if change.created:
            viewer.layers.remove(layer)
            touched.pop(id(layer), None)
        elif change.key is None:
            layer.data = change.previous
            touched[id(layer)] = layer
        else:
            layer.data[change.key] = change.previous
            touched[id(layer)] = layer
    _refresh(list(touched.values()))
    return names


def draw_tiles(viewer: Any, image_layer: Any, plan: Any, region: Region) -> Any:
    """Draw a tile plan's tiles as rectangles in a Shapes layer over the image.

    Args:
        viewer: the napari viewer.
        image_layer: the image the plan is for.
        plan: a :class:`~napari_medseg.engine.inference.plan.TilePlan` of ``region``.
        region: the part of the image the plan covers (its in-plane offset places tiles).

    Returns:
        The ``<image> tiles`` Shapes layer (2D, shown on every slice).
    """
    y0, x0 = region.start[-2:]
    rects = []
    seen = set()
    for lo, hi in plan.grid.boxes():
        box = (lo[-2] + y0, lo[-1] + x0, hi[-2] + y0, hi[-1] + x0)
        if box in seen:
            continue
        seen.add(box)
        a, b, c, d = box
        rects.append(np.array([[a - 0.5, b - 0.5], [c - 0.5, d - 0.5]], float))
    scale = tuple(image_layer.scale)[-2:]
    translate = tuple(image_layer.translate)[-2:]
    kwargs: dict[str, Any] = {}
    units = getattr(image_layer, "units", None)
    if units is not None and len(tuple(units)) >= 2:
        kwargs["units"] = tuple(str(u) for u in tuple(units)[-2:])
    labels = tuple(getattr(image_layer, "axis_labels", ()) or ())
    if len(labels) >= 2:
        kwargs["axis_labels"] = labels[-2:]
    old = find_output(viewer, image_layer.name, "tiles")
    if old is not None:
        viewer.layers.remove(old)
    return viewer.add_shapes(
        rects, shape_type="rectangle", name=output_name(image_layer.name, "tiles"),
        edge_color="cyan", face_color="transparent", edge_width=max(scale), scale=scale,
        translate=translate, opacity=0.8,
        metadata={OUTPUT_KEY: {"image": image_layer.name, "output": "tiles"}}, **kwargs)
