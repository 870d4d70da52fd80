"""The Segment dock widget: pick a network, run it on a layer, edit masks and boundary maps.

A thin skin over the engine. The widget gathers its values into a
:class:`~.session.RunSettings` (which builds the engine's ``PredictConfig``), computes the
region to segment from the viewer (slice, visible region or image:
:mod:`napari_medseg.engine.inference.regions`), and runs the engine's ``predict_iter`` in a
napari thread worker (:mod:`.worker`) with napari's cancellable progress bar. The results
become layers in :mod:`.result_layers`; the session keeps probabilities (so the threshold
re-derives masks without running the network), measured timings (for the plan) and the
undo stack (a user's edits are copied before anything overwrites them).

Everything slow -- loading a network, the tile plan, predictions, re-thresholding, boundary
tools, metrics -- runs off the GUI thread; the GUI thread only copies finished arrays into
layers. The boxes are their own widgets: the model picker (:mod:`.weights_panel`, which
publishes the choice to :mod:`.viewer_state`), the run settings (:mod:`.run_panel`), the tile
plan (:mod:`.plan_panel`), the boundary tools and metrics (:mod:`.tools_panel`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from napari.layers import Image
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import QLabel, QPushButton, QWidget

from ..engine.inference.plan import format_seconds
from ..engine.inference.editing import scope_region
from ..engine.inference.regions import Region
from ..engine.progress import NoticeEvent, PlaneEvent, PlanEvent, StageEvent, TilesEvent
from ..engine.seg_task import mask_classes
from ..errors import ConfigError, MedsegError
from . import lazy_outputs, result_layers
from .image_picker import ImagePickerMixin
from .layers import layer_traits
from .plan_panel import PlanPanel
from .run_panel import SCOPES, RunPanel
from .session import RunSettings, SegmentSession, WeightsChoice
from .tools_panel import MetricsPanel, ToolsPanel
from .viewer_state import viewer_state
from .weights_panel import WeightsPanel
from .worker import (
    JobOutcome,
    LongJob,
    RunProgress,
    catalog_job,
    error_html,
    guard_llvm_clash,
    row_widget,
    run_job,
    scroll_root,
    show_notice,
    start_job,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentWidget", "SCOPES"]

def _count(n: Any, noun: str) -> str:
    """``1 tile pass``, ``6 tile passes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _painted_text(edit: Any) -> str:
    """What a run did to the pixels the user had painted, for the status line."""
    if not edit.painted:
        return ""
    if edit.kept_painted:
        return f" Kept the {edit.painted} mask pixels you painted."
    return (f" Replaced {edit.painted} mask pixels you had painted (Undo last brings "
            "them back).")


class SegmentWidget(ImagePickerMixin, QWidget):
    """Dock widget running a segmentation network on an image layer.

    Args:
        napari_viewer: the viewer it is docked in (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        guard_llvm_clash()  # before the networks import torch._dynamo (see the function)
        self.viewer = napari_viewer
        #: what the viewer's dock widgets share (networks, the weights chosen here).
        self.state = viewer_state(napari_viewer)
        self.session = SegmentSession(models=self.state.models)
        self._disconnected = False
        self._workers: set[Any] = set()
        #: the prediction; its context is (image name, settings, region).
        self._job = LongJob()
        self._ready = False
        self._warned_untrained: set[tuple[str, str]] = set()
        self._progress: RunProgress | None = None
        self.last_outcome: JobOutcome | None = None
        #: (layer steps, layers added so far, run context, outcome) while a finished run's
        #: new output layers are added one per event-loop turn.
        self._staging: tuple | None = None
        #: a run of a lazy (dask, zarr, multiscale) image streams into a store (issue #23).
        self._lazy: lazy_outputs.LazyResult | None = None
        result_layers.prewarm_layer_code()
        self.last_error: str | None = None
        #: an image layer to choose at the next list refresh (newly opened or selected).
        self._follow: str | None = None
        #: the image chosen at the last list refresh.
        self._image_name: str | None = None
        #: weights chosen through :meth:`select_weights` before the network list arrived.
        self._pending_weights: str | None = None
        #: the run in flight keeps the user's painting (see :meth:`run`).
        self._keep_painted = False
        self._build()
        self._plan_timer = self.plan_panel.timer
        self._threshold_timer = self.run_panel.threshold_timer
        self._connect()
        self._refresh_layers()
        self.plan_label.setText("Loading the networks…")
        # Importing the networks (torch, timm) takes seconds: done in a worker, so that
        # opening the widget does not freeze the viewer.
        self.start_worker(catalog_job, on_done=self._on_catalog)

    def _on_catalog(self, outcome: JobOutcome) -> None:
        if not outcome.ok:
            self.plan_label.setText(error_html(outcome.error))
            self.report_error(outcome.error or "The networks could not be loaded.")
            return
        self._ready = True
        self.weights_panel.set_catalog(*outcome.value)
        image = self.current_image()
        if self._pending_weights is not None:
            self.select_weights(self._pending_weights)
        if image is not None:
            self.weights_panel.propose(layer_traits(image))
        self.refresh_enabled()
        self.plan_panel.schedule()

    @property
    def ready(self) -> bool:
        """True once the networks and devices are listed."""
        return self._ready

    # ------------------------------------------------------------------ UI ----------
    def _build(self) -> None:
        """The boxes (each its own widget); their controls are attributes of the widget too."""
        root = scroll_root(self)
        root.setSpacing(6)
        self.weights_panel = WeightsPanel(self.state)
        self.run_panel = RunPanel(self)
        self.plan_panel = PlanPanel(self)
        self.tools_panel = ToolsPanel(self)
        self.metrics_panel = MetricsPanel(self)
        for panel, names in (
                (self.weights_panel, ("image_combo", "network_combo", "variant_combo",
                                      "weights_combo", "browse_button", "untrained_label",
                                      "device_combo")),
                (self.run_panel, ("scope_combo", "tile_spin", "overlap_spin", "blend_combo",
                                  "tta_check", "sr_check", "probs_check", "variance_check",
                                  "threshold_slider", "diameter_spin")),
                (self.plan_panel, ("plan_label", "measure_button", "tiles_button")),
                (self.tools_panel, ("boundary_button", "instances_button")),
                (self.metrics_panel, ("reference_combo", "metrics_button", "metrics_table",
                                      "metrics_caption"))):
            for name in names:
                setattr(self, name, getattr(panel, name))
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Segment the scope with the chosen network (click again "
                                   "to cancel: what is finished is kept).")
        self.run_button.setMinimumHeight(28)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("Restore the layers as they were before the last run, "
                                    "threshold change or boundary tool (your edits too).")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.weights_panel)
        root.addWidget(self.run_panel)
        root.addWidget(self.plan_panel)
        root.addWidget(row_widget(self.run_button, self.undo_button))
        root.addWidget(self.status_label)
        root.addWidget(self.tools_panel)
        root.addWidget(self.metrics_panel)
        root.addStretch(1)

    def _connect(self) -> None:
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.weights_panel.changed.connect(self._on_weights_changed)
        self.weights_panel.failed.connect(self.report_error)
        self.state.serve_weights(self._serve_weights)
        for signal in (self.device_combo.currentIndexChanged,
                       self.scope_combo.currentIndexChanged,
                       self.tile_spin.valueChanged, self.overlap_spin.valueChanged,
                       self.blend_combo.currentIndexChanged, self.tta_check.toggled,
                       self.diameter_spin.valueChanged):
            signal.connect(self.plan_panel.schedule)
        self.tta_check.toggled.connect(self.refresh_enabled)
        self.run_button.clicked.connect(self._on_run_clicked)
        self.undo_button.clicked.connect(self.undo)
        for emitter, callback in self._viewer_hooks():
            emitter.connect(callback)

    def _viewer_hooks(self) -> list[tuple[Any, Any]]:
        """The viewer's events the widget follows: its layer list, the slice, the camera."""
        return self._layer_hooks() + [
            (self.viewer.layers.selection.events.active, self._on_active_layer),
            (self.viewer.dims.events.current_step, self.plan_panel.follow_view),
            (self.viewer.camera.events.zoom, self.plan_panel.follow_view),
            (self.viewer.camera.events.center, self.plan_panel.follow_view)]

    # ------------------------------------------------------------- weights -----------
    def _on_weights_changed(self) -> None:
        choice = self.current_weights()
        # flip TTA starts as the weights say (on where their thresholds were tuned with it)
        self.tta_check.setChecked(choice is not None and choice.tta)
        self.refresh_enabled()
        self.plan_panel.schedule()

    def add_checkpoint(self, path: str) -> None:
        """Add a checkpoint file to the weights list and select it (its network too)."""
        self.weights_panel.add_checkpoint(path)

    def refresh_enabled(self, *_: Any) -> None:
        """Enable the controls that may change now (none while a prediction runs)."""
        running = self.running
        has_image = self.current_image() is not None and self._ready
        for w in (self.image_combo, self.network_combo, self.weights_combo,
                  self.browse_button, self.device_combo, self.scope_combo, self.tile_spin,
                  self.overlap_spin, self.blend_combo, self.tta_check, self.measure_button,
                  self.tiles_button, self.boundary_button, self.instances_button,
                  self.probs_check, self.sr_check):
            w.setEnabled(not running)
        choice = self.current_weights()
        self.variant_combo.setEnabled(not running and choice is not None and choice.untrained)
        self.diameter_spin.setEnabled(not running and choice is not None and choice.instances)
        self.variance_check.setEnabled(not running and self.tta_check.isChecked())
        self.run_button.setText("Cancel" if running else "Run")
        self.run_button.setEnabled(running or has_image)
        self.undo_button.setEnabled(not running and self.session.can_undo)
        single = choice is None or choice.num_classes == 1
        self.threshold_slider.setEnabled(single)

    # ----------------------------------------------------------- settings -------------
    def current_weights(self) -> WeightsChoice | None:
        """The chosen weights."""
        return self.weights_panel.current_weights()

    def settings(self, image: Image) -> RunSettings:
        """The widget's values for ``image``.

        Raises:
            ConfigError, InputShapeError: no weights chosen; axes that cannot be told.
        """
        choice = self.current_weights()
        if choice is None:
            raise ConfigError("Choose a network and weights first.")
        return RunSettings(
            weights=choice, variant=self.variant_combo.currentText(),
            device=self.device_combo.currentData() or "cpu",
            tile=self.tile_spin.value() or None, overlap=self.overlap_spin.value(),
            blend=self.blend_combo.currentText(),
            threshold=round(float(self.threshold_slider.value()), 4),
            tta=self.tta_check.isChecked(), show_probabilities=self.probs_check.isChecked(),
            show_variance=self.variance_check.isChecked() and self.tta_check.isChecked(),
            axes=result_layers.image_axes(image), super_resolved=self.sr_check.isChecked(),
            diameter=self.diameter_spin.value() or None)

    def region(self, image: Image) -> Region:
        """The part of ``image`` the scope covers (its non-channel axes)."""
        scope = self.scope_combo.currentData()
        if scope == "whole":
            return scope_region(scope, result_layers.image_shape(image))
        level = getattr(image, "data_level", 0)
        factors = (image.downsample_factors[level]
                   if getattr(image, "multiscale", False) and level else None)
        return scope_region(scope, result_layers.image_shape(image),
                            image.world_to_data(self.viewer.dims.point), image.corner_pixels,
                            factors, min_size=self.tile_spin.value() or 128)

    @staticmethod
    def _in_channels(image: Image) -> int:
        return 3 if getattr(image, "rgb", False) else 1

    def crop(self, image: Image, region: Region) -> Any:
        """The part of ``image``'s data (all its channels) inside ``region``."""
        extra = 1 if getattr(image, "rgb", False) else 0
        return result_layers.image_array(image)[region.key(extra)]

    def start_worker(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Start a job in a thread worker and keep it referenced until it finishes."""
        token = object()
        self._workers.add(token)
        return start_job(func, *args, on_finished=functools.partial(
            self._workers.discard, token), **kwargs)

    @property
    def busy(self) -> bool:
        """True while any job of this widget (run, plan, threshold, tools, metrics) runs."""
        return bool(self._workers)

    # ------------------------------------------------------------------ run -------------
    @property
    def running(self) -> bool:
        """True while a prediction runs (or its output layers are being added)."""
        return self._job.running or self._staging is not None

    @property
    def predicting(self) -> bool:
        """True while the network runs (not counting the output layers being added)."""
        return self._job.running

    def _on_run_clicked(self) -> None:
        self._job.toggle(self.run, self.cancel)

    def run(self, keep_painted: bool = False) -> Any:
        """Segment the scope of the chosen image; returns the worker (None if refused).

        Args:
            keep_painted: keep the pixels the user painted over the last prediction (the
                re-run after fine-tuning); otherwise the status says how many were replaced.
        """
        if self.running:
            return None
        self._keep_painted = bool(keep_painted)
        image = self.current_image()
        if image is None:
            self.report_error("Choose an image layer to segment.")
            return None
        try:
            settings = self.settings(image)
            config = settings.config()
            region = self.region(image)
        except MedsegError as exc:
            self.report_error(str(exc))
            return None
        self.plan_panel.stop()  # a plan in flight is stale now
        self._lazy = lazy_outputs.LazyResult.for_run(self.viewer, image, region, config) if (
            lazy_outputs.is_lazy(image)) else None
        config = self._lazy.config(config) if self._lazy is not None else config
        context = (image.name, settings, region)
        token = self._job.begin(context)
        self._progress = RunProgress(total=0, desc=f"Segmenting {image.name}",
                                     cancel_callback=token.cancel)
        untrained = (settings.weights.network, settings.variant)
        if settings.weights.untrained and untrained not in self._warned_untrained:
            self._warned_untrained.add(untrained)  # the widget's own warning stays shown
            show_warning(f"Segmenting {image.name!r} with an untrained "
                         f"{settings.weights.network} ({settings.variant}): the masks are "
                         "meaningless until it is trained.")
        self.status_label.setText(f"Segmenting {region.describe(settings.axes.replace('C', ''))}…")
        worker = self.start_worker(run_job, self.session, settings.weights, settings.variant,
                           self._in_channels(image), self.crop(image, region), config, token,
                           result_layers.pixel_meta(image),
                           on_done=functools.partial(self._on_run_done, context),
                           on_yield=self._on_run_event, cancel_token=token)
        self._job.worker = worker
        self.refresh_enabled()
        return worker

    def cancel(self) -> None:
        """Stop the running prediction after its current batch (what is finished is kept)."""
        if self._job.cancel():
            self.status_label.setText("Cancelling after the current batch…")

    def _on_run_event(self, event: Any) -> None:
        if not self._job.running:  # an event queued behind the end of the run
            return
        if self._lazy is not None:
            self._lazy.on_event(event)
        if isinstance(event, TilesEvent):
            if self._progress is not None:
                self._progress.set_done(event.done, event.total)
            eta = f", ~{format_seconds(event.eta_s)} left" if event.eta_s is not None else ""
            where = f"slice {event.plane + 1}/{event.planes}: " if event.planes > 1 else ""
            self.status_label.setText(
                f"{where}{event.done}/{_count(event.total, 'tile pass')}{eta}")
        elif isinstance(event, PlanEvent) and event.plan is not None:
            if self._job.context is not None:
                self.plan_panel.show_plan(event.plan, self._job.context[2])
        elif isinstance(event, NoticeEvent):
            show_notice(event, self.status_label)
        elif isinstance(event, StageEvent):
            self.status_label.setText(event.message)
        elif isinstance(event, PlaneEvent) and event.planes > 1 and self._progress is not None:
            self._progress.set_description(
                f"Segmenting: slice {event.plane + 1} of {event.planes} done")

    def _on_run_done(self, context: tuple, outcome: JobOutcome) -> None:
        image_name, settings, region = context
        self._job.end()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._lazy is not None:  # streamed into a store: its layer is the result
            lazy, self._lazy, self.last_outcome = self._lazy, None, outcome
            if outcome.ok:
                self.status_label.setText(lazy.finish(outcome.value.result))
            else:
                self.report_error(outcome.error or "The run failed.")
            self.refresh_enabled()
            return
        if outcome.ok and image_name in self.viewer.layers:
            # New output layers are added one per event-loop turn: napari takes a few
            # hundred milliseconds to add each, and all at once would freeze the viewer
            # for their sum.
            steps = result_layers.create_missing_outputs(
                self.viewer, self.viewer.layers[image_name], outcome.value.result,
                settings.show_probabilities, settings.show_variance)
            self._staging = (steps, [], context, outcome)
            self._stage_next_output()
        else:
            self._finish_run(context, outcome, [])

    def _stage_next_output(self) -> None:
        """Add the next missing output layer, or write the result when none is left."""
        steps, created, context, outcome = self._staging
        try:
            if context[0] in self.viewer.layers:
                created.append(next(steps))
                QTimer.singleShot(0, self._stage_next_output)
                return
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - reported as a failed run
            outcome = JobOutcome(error=f"Could not add the output layers: {exc}",
                                 exception=exc, seconds=outcome.seconds)
        self._staging = None
        self._finish_run(context, outcome, created)

    def _finish_run(self, context: tuple, outcome: JobOutcome, created: list) -> None:
        image_name, settings, region = context
        self.last_outcome = outcome
        written = False
        try:
            if not outcome.ok:
                self.report_error(outcome.error or "The run failed.")
                return
            result, spec = outcome.value.result, outcome.value.spec
            if result.plan is not None:
                self.session.remember_timing(settings.weights, settings.variant, result.plan)
            if image_name not in self.viewer.layers:
                self.report_error(f"The image {image_name!r} was removed during the run; nothing "
                            "was written.")
                return
            image = self.viewer.layers[image_name]
            from ..models.spec import HEAD_BOUNDARY

            edit = result_layers.apply_run(
                self.viewer, image, result, region, self.session,
                settings.show_probabilities, settings.show_variance,
                has_boundary_head=HEAD_BOUNDARY in spec.heads, created=created,
                keep_painted=self._keep_painted)
            written = bool(edit.changes)
            if not edit.changes:
                message = "Cancelled before any slice finished; nothing was written."
                show_warning(message)
                self.status_label.setText(message)
                return
            self.session.num_classes[image_name] = mask_classes(spec)
            seconds = result.stats.get("seconds", outcome.seconds)
            if result.cancelled:
                total = result.plan.planes if result.plan is not None else "?"
                message = (f"Cancelled: {len(result.planes_done)} of {total} slice(s) "
                           "finished are kept.")
                show_warning(message)
                self.status_label.setText(message)
            else:
                self.status_label.setText(
                    f"Done in {format_seconds(seconds)} on {result.stats.get('device', '?')} "
                    f"({result.stats.get('precision', '?')}, "
                    f"{_count(result.stats.get('forward_passes', '?'), 'tile pass')})."
                    + _painted_text(edit))
            self.threshold_slider.setEnabled(int(spec.num_classes) == 1)
            if int(spec.num_classes) == 1 and abs(
                    float(self.threshold_slider.value()) - settings.threshold) > 1e-6:
                self._threshold_timer.start()  # the slider moved during the run
            mask = result_layers.find_output(self.viewer, image_name, "mask")
            if mask is not None:
                self.viewer.layers.selection.active = mask
            if self.metrics_panel.reference:
                self.update_metrics()
        finally:
            if not written:  # layers made for a result that was not written go again
                for layer in created:
                    if layer in self.viewer.layers:
                        self.viewer.layers.remove(layer)
            self.refresh_enabled()
            if written:  # planned again: the time this run measured is known now
                self.plan_panel.schedule()
            else:
                self.plan_panel.show_last()

    # --------------------------------------------------------------- undo --------------
    def undo(self) -> None:
        """Undo the last run, threshold change or boundary tool (edits come back too)."""
        edit = self.session.pop()
        if edit is None:
            return
        names = result_layers.undo(self.viewer, edit)
        self.status_label.setText(f"Undid {edit.label}" + (
            f" ({', '.join(names)})." if names else "."))
        self.refresh_enabled()

    # ------------------------------------------------- boundary tools, metrics --------
    def boundary_from_mask(self) -> Any:
        """Derive the boundary layer from the mask layer (in a worker; undoable)."""
        return self.tools_panel.boundary_from_mask()

    def instances_from_mask(self) -> Any:
        """Split the mask into instances along the boundary layer (watershed; undoable)."""
        return self.tools_panel.instances_from_mask()

    def update_metrics(self, *_: Any) -> Any:
        """Score the mask against the chosen reference layer (in a worker)."""
        return self.metrics_panel.refresh_scores()

    @property
    def last_metrics(self) -> dict[int, dict[str, float]] | None:
        """The scores last shown in the metrics table, or None."""
        return self.metrics_panel.last_scores

    # ------------------------------------------------- fine-tuning hook (issue 8) ------
    def use_weights(self, source: str, image_name: str | None = None,
                    scope: str | None = "visible") -> Any:
        """Select weights and segment again (the Fine-tune widget calls this when it ends).

        Args:
            source: a checkpoint path (``.json``/``.safetensors``) or a model card's tag.
            image_name: the image layer to segment; None keeps the current one.
            scope: ``"slice"``, ``"visible"`` or ``"whole"`` for this run only; None uses
                the widget's scope.

        Returns:
            The run's worker, or None when no run started (a run is going on, or an error
            was shown).
        """
        if not self.ready:  # the network list is still loading: try again shortly
            QTimer.singleShot(200, functools.partial(self.use_weights, source, image_name,
                                                     scope))
            return None
        if not self.weights_panel.select_source(str(source)):
            return None
        self.weights_panel.keep_user_choice()  # fine-tuned weights stay chosen
        if image_name and image_name in [self.image_combo.itemText(i)
                                         for i in range(self.image_combo.count())]:
            self.image_combo.setCurrentText(image_name)
        if self.running:
            self.status_label.setText("New weights selected; run again when this run ends.")
            return None
        previous = self.scope_combo.currentIndex()
        wanted_scope = self.scope_combo.findData(scope) if scope else -1
        if wanted_scope >= 0:
            self.scope_combo.blockSignals(True)
            self.scope_combo.setCurrentIndex(wanted_scope)
        try:
            return self.run(keep_painted=True)
        finally:
            if wanted_scope >= 0:
                self.scope_combo.setCurrentIndex(previous)
                self.scope_combo.blockSignals(False)

    def select_weights(self, source: str) -> bool:
        """Choose weights (a card's tag or a checkpoint path) as the user would: they are
        kept for every image until changed. False (with a message) when unknown."""
        if not self.ready:  # the network list is still loading: chosen once it is there
            self._pending_weights = str(source)
            return True
        self._pending_weights = None
        chosen = self.weights_panel.select_source(str(source))
        if chosen:
            self.weights_panel.keep_user_choice()
        return chosen

    # ------------------------------------------------------------- messages -----------
    def report_error(self, message: str) -> None:
        """Show one sentence as a napari error notification (and in the status line)."""
        self.last_error = message
        self.status_label.setText(error_html(message))
        show_error(message)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Cancel a running prediction and let go of the viewer when the widget closes."""
        self.cancel()
        self._disconnect()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:  # noqa: D102 - Qt override
        # napari's dock close button takes the widget out of its dock without closing it:
        # a Segment widget without a parent stops serving the viewer's other widgets.
        if (event.type() == QEvent.Type.ParentChange and self.parent() is None
                and getattr(self, "_disconnected", None) is False):
            self.cancel()
            self._disconnect()
        return super().event(event)

    def _serve_weights(self, source: str, image_name: str | None, scope: str | None) -> bool:
        return self.use_weights(source, image_name=image_name, scope=scope) is not None

    def _disconnect(self) -> None:
        if self._disconnected:
            return
        self._disconnected = True
        self.plan_panel.stop()  # a plan in flight is for nobody now
        self.state.serve_weights(None)
        self.state.choose(None, "")
        for emitter, callback in self._viewer_hooks():
            emitter.disconnect(callback)

