"""The Segment widget's "Tile plan" box: the plan of the next run, kept up to date.

:class:`PlanPanel` computes the tile plan of the host's settings and region in a worker
(:func:`~.worker.plan_job`; debounced while the user changes settings or moves the view),
measures one batch on request (Measure time), shows the plan with its time estimate
(measured timings are remembered by the session) and draws the tiles as a Shapes layer. It
works for a *host*, the Segment widget, through its public methods (``current_image``,
``settings``, ``region``, ``crop``, ``start_worker``) and attributes (``viewer``,
``session``, ``ready``, ``running``, ``predicting``).
"""

from __future__ import annotations

import functools
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QGroupBox, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from ..engine.inference.regions import Region
from ..errors import MedsegError
from . import result_layers
from .session import RunSettings
from .worker import JobOutcome, error_html, plan_job, row_widget

__all__ = ["PlanPanel"]


class PlanPanel(QGroupBox):
    """The "Tile plan" box of ``host``.

    Attributes:
        plan: ``(plan, region, image name)`` of the last plan shown, or None.
        timer: the debounce timer of :meth:`schedule`.
    """

    def __init__(self, host: Any, parent: QWidget | None = None) -> None:
        super().__init__("Tile plan", parent)
        self.host = host
        self.plan: tuple[Any, Region, str] | None = None
        self._generation = 0
        self._draw_after_plan = False
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.plan_label = QLabel("…")
        self.plan_label.setWordWrap(True)
        self.plan_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label.setSizePolicy(QSizePolicy.Policy.Preferred,
                                      QSizePolicy.Policy.Minimum)
        lay.addWidget(self.plan_label)
        self.measure_button = QPushButton("Measure time")
        self.measure_button.setToolTip("Run one batch to measure the time per tile and the "
                                       "memory (the estimate then shows the run's time).")
        self.tiles_button = QPushButton("Draw tiles")
        self.tiles_button.setToolTip("Show the tiles as rectangles in a Shapes layer.")
        lay.addWidget(row_widget(self.measure_button, self.tiles_button))
        self.setLayout(lay)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(300)
        self.timer.timeout.connect(self.compute)
        self.measure_button.clicked.connect(lambda: self.compute(probe=True))
        self.tiles_button.clicked.connect(self.draw_tiles)

    def schedule(self, *_: Any) -> None:
        """Compute the plan again shortly (settings changed)."""
        if (not self.host.running and self.host.ready
                and not getattr(self.host, "_disconnected", False)):
            self.timer.start()

    def stop(self) -> None:
        """Forget a pending or computing plan (a run starts: it shows its own plan)."""
        self.timer.stop()
        self._generation += 1

    def follow_view(self, *_: Any) -> None:
        """The slice or the camera moved: the region of a slice/visible scope follows.

        A region of the same shape keeps its plan (only its position is shown again);
        another shape gets a new plan (debounced).
        """
        host = self.host
        if host.scope_combo.currentData() == "whole" or host.running or not host.ready:
            return
        image = host.current_image()
        if image is None:
            return
        try:
            region = host.region(image)
        except MedsegError:
            return
        if self.plan is not None and self.plan[2] == image.name and (
                self.plan[1].shape == region.shape) and not self.timer.isActive():
            self.plan = (self.plan[0], region, image.name)
            self.show_plan(self.plan[0], region)
        else:
            self.schedule()

    def compute(self, probe: bool = False) -> None:
        """Compute the plan of the host's settings now (``probe``: measure one batch)."""
        host = self.host
        image = host.current_image()
        if image is None:
            self.plan_label.setText("Open or choose an image layer.")
            return
        if host.predicting:
            return
        try:
            settings = host.settings(image)
            config = settings.config()
            region = host.region(image)
        except MedsegError as exc:
            self.plan_label.setText(error_html(exc))
            return
        self._generation += 1
        self.plan_label.setText("Measuring one batch…" if probe else "Computing the plan…")
        in_channels = 3 if getattr(image, "rgb", False) else 1
        host.start_worker(plan_job, host.session, settings.weights, settings.variant,
                          in_channels, host.crop(image, region), config, probe,
                          result_layers.pixel_meta(image),
                          on_done=functools.partial(self._on_done, self._generation, settings,
                                                    region, image.name))

    def _on_done(self, generation: int, settings: RunSettings, region: Region,
                 image_name: str, outcome: JobOutcome) -> None:
        from qtpy import sip

        if generation != self._generation or sip.isdeleted(self.plan_label):
            return  # a newer plan was asked for, or the widget was closed meanwhile
        if not outcome.ok:
            self.plan_label.setText(error_html(outcome.error))
            self._draw_after_plan = False
            return
        session = self.host.session
        plan, _spec = outcome.value
        session.remember_timing(settings.weights, settings.variant, plan)
        plan = session.with_known_timing(settings.weights, settings.variant, plan)
        self.plan = (plan, region, image_name)
        session.last_plan = plan
        self.show_plan(plan, region)
        if self._draw_after_plan:
            self._draw_after_plan = False
            self.draw_tiles()

    def show_plan(self, plan: Any, region: Region) -> None:
        """Show ``plan`` for ``region`` (its time, or how to measure it)."""
        image = self.host.current_image()
        axes = result_layers.image_axes(image).replace("C", "") if image is not None else None
        text = plan.describe()
        if plan.seconds is None:
            text += "\nTime: press Measure time (runs one batch)."
        self.plan_label.setText(f"{region.describe(axes)}\n{text}")

    def show_last(self) -> None:
        """Show the last plan again (after a run showed its own)."""
        if self.plan is not None:
            self.show_plan(self.plan[0], self.plan[1])

    def draw_tiles(self) -> None:
        """Draw the plan's tiles as a Shapes layer (computing the plan first if needed)."""
        host = self.host
        image = host.current_image()
        if image is None:
            return
        if self.plan is None or self.plan[2] != image.name or self.timer.isActive():
            self._draw_after_plan = True
            self.compute()
            return
        plan, region, _ = self.plan
        result_layers.draw_tiles(host.viewer, image, plan, region)
        host.viewer.layers.selection.active = image
