"""The Segment widget's image picker: it follows the viewer's layer list.

A newly opened image, or an image layer the user selects, becomes the image to segment
(never while a prediction runs); when the chosen image changes, the widget proposes the
weights that match it, plans again and picks the reference that can score it (the image's
``"<image> annotation"`` layer when there is one; layers on another grid are not offered,
so a reference never turns into an error on the next image).
"""

from __future__ import annotations

from typing import Any

from napari.layers import Image, Labels

from . import result_layers
from .layers import layer_traits
from .worker import LayerListMixin

__all__ = ["ImagePickerMixin"]


class ImagePickerMixin(LayerListMixin):
    """The image list of a Segment widget, kept in step with the viewer.

    The widget provides ``viewer``, ``session``, ``image_combo``, ``weights_panel``,
    ``run_panel``, ``plan_panel``, ``metrics_panel``, ``running``, ``refresh_enabled`` and
    ``update_metrics``, and sets ``_ready``, ``_follow`` (a layer name to choose at the next
    refresh) and ``_image_name`` (the image chosen at the last refresh).
    """

    viewer: Any
    _ready: bool
    _follow: str | None
    _image_name: str | None

    def current_image(self) -> Image | None:
        """The chosen image layer, or None."""
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, Image):
                return layer
        return None

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        mark = (getattr(layer, "metadata", None) or {}).get(result_layers.OUTPUT_KEY)
        if isinstance(mark, dict):  # an output went: what the network wrote there is moot
            self.session.predicted.pop((mark.get("image"), mark.get("output")), None)
        elif isinstance(layer, Image) and layer.name not in [
                lay.name for lay in self.viewer.layers]:
            self.session.forget(layer.name)
        self._refresh_layers()

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        if isinstance(layer, Image) and not result_layers.is_output(layer):
            self._follow = layer.name  # a newly opened image is the one to segment
        super()._on_layer_inserted(event)

    def _on_active_layer(self, event: Any) -> None:
        layer = event.value
        if (isinstance(layer, Image) and not result_layers.is_output(layer)
                and not self.running and layer.name != self.image_combo.currentText()):
            self._follow = layer.name
            self._refresh_layers()

    def _refresh_layers(self, *_: Any) -> None:
        images = [lay.name for lay in self.viewer.layers
                  if isinstance(lay, Image) and not result_layers.is_output(lay)]
        current = self.image_combo.currentText()
        follow, self._follow = self._follow, None
        if follow in images and not self.running:
            current = follow
        elif current not in images:
            active = self.viewer.layers.selection.active
            current = active.name if isinstance(active, Image) and active.name in images else (
                images[-1] if images else "")
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(images)
        if current:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        image = self.image_combo.currentText()
        shown = self.current_image()
        switched = image != self._image_name
        self._image_name = image
        self.metrics_panel.set_references(
            self._reference_names(shown),
            prefer=f"{image} annotation" if switched and image else None)
        self.run_panel.set_whole_label(
            shown is not None and len(result_layers.image_shape(shown)) > 2)
        self.refresh_enabled()
        if switched:
            self._on_image_switched(shown)
        elif self.plan_panel.plan is not None and self.plan_panel.plan[2] != image:
            self.plan_panel.schedule()

    def _reference_names(self, image: Image | None) -> list[str]:
        """Labels layers that can score ``image``'s mask: on its grid, not its own outputs."""
        if image is None:
            return []
        shape = result_layers.image_shape(image)
        return [lay.name for lay in self.viewer.layers
                if isinstance(lay, Labels) and not result_layers.is_output(lay, image.name)
                and tuple(lay.data.shape) == shape]

    def _on_image_switched(self, image: Image | None) -> None:
        """Another image is chosen: weights that match it, a new plan, its scores."""
        if image is not None and self._ready:
            self.weights_panel.propose(layer_traits(image))
        self.plan_panel.schedule()
        if self.metrics_panel.reference:
            self.update_metrics()
        else:
            self.metrics_panel.show_message("")

    def _on_image_changed(self, *_: Any) -> None:
        self._refresh_layers()

