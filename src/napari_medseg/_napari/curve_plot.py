"""The Fine-tune widget's live plot: training loss and validation Dice against the step.

Drawn with plain QPainter (the viewer's environment has no plotting library); adding a point
only schedules a repaint, so thousands of steps cost the GUI thread nothing between paints.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["CurvePlot"]


class CurvePlot(QWidget):
    """Training loss (left axis) and validation Dice (right axis, 0-1) against the step.

    Drawn with QPainter; adding a point only schedules a repaint, so thousands of steps cost
    the GUI thread nothing between paints.
    """

    LOSS = QColor(80, 170, 255)
    LOSS_RAW = QColor(80, 170, 255, 70)
    DICE = QColor(255, 176, 0)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.loss: list[tuple[int, float]] = []
        self.smooth: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.total = 1
        self.best: tuple[int, float] | None = None

    def clear(self, total_steps: int) -> None:
        """Forget the curves; the x axis spans ``total_steps``."""
        self.loss, self.smooth, self.dice, self.best = [], [], [], None
        self.total = max(1, int(total_steps))
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        """One training step's loss (its running mean is drawn too)."""
        if not math.isfinite(loss):
            return
        self.loss.append((step, loss))
        prev = self.smooth[-1][1] if self.smooth else loss
        self.smooth.append((step, 0.9 * prev + 0.1 * loss if self.smooth else loss))
        self.update()

    def add_dice(self, step: int, dice: float, best: bool = False) -> None:
        """A validation Dice (``best`` marks the kept weights)."""
        if not math.isfinite(dice) or dice < 0:
            return
        self.dice.append((step, dice))
        if best or self.best is None:
            self.best = (step, dice)
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Draw the axes, the loss (raw and smoothed) and the validation Dice."""
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(p.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        w, h = self.width(), self.height()
        left, right, top, bottom = 40, 34, 8, 18
        area = QRectF(left, top, max(10, w - left - right), max(10, h - top - bottom))
        p.fillRect(self.rect(), QColor(30, 30, 34))
        p.setPen(QPen(QColor(110, 110, 120), 1))
        p.drawRect(area)
        text = QColor(200, 200, 200)
        p.setPen(text)
        p.drawText(QRectF(left, h - bottom + 2, area.width(), bottom - 2),
                   int(Qt.AlignmentFlag.AlignLeft), "0")
        p.drawText(QRectF(left, h - bottom + 2, area.width(), bottom - 2),
                   int(Qt.AlignmentFlag.AlignRight), f"{self.total} steps")
        if self.loss:
            values = [v for _, v in self.loss]
            lo, hi = min(values), max(values)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            p.setPen(self.LOSS)
            p.drawText(QRectF(0, top - 4, left - 4, 14), int(Qt.AlignmentFlag.AlignRight),
                       f"{hi:.3g}")
            p.drawText(QRectF(0, top + area.height() - 10, left - 4, 14),
                       int(Qt.AlignmentFlag.AlignRight), f"{lo:.3g}")

            def point(step: int, value: float) -> QPointF:
                x = area.left() + area.width() * step / self.total
                y = area.bottom() - area.height() * (value - lo) / (hi - lo)
                return QPointF(x, y)

            for series, color, width in ((self.loss, self.LOSS_RAW, 1.0),
                                         (self.smooth, self.LOSS, 1.6)):
                path = QPainterPath(point(*series[0]))
                for s, v in series[1:]:
                    path.lineTo(point(s, v))
                p.setPen(QPen(color, width))
                p.drawPath(path)
        p.setPen(self.DICE)
        p.drawText(QRectF(area.right() + 3, top - 4, right, 14), int(Qt.AlignmentFlag.AlignLeft),
                   "1")
        p.drawText(QRectF(area.right() + 3, top + area.height() - 10, right, 14),
                   int(Qt.AlignmentFlag.AlignLeft), "0")
        if self.dice:
            def dpoint(step: int, value: float) -> QPointF:
                x = area.left() + area.width() * step / self.total
                return QPointF(x, area.bottom() - area.height() * value)

            path = QPainterPath(dpoint(*self.dice[0]))
            for s, v in self.dice[1:]:
                path.lineTo(dpoint(s, v))
            p.setPen(QPen(self.DICE, 1.6))
            p.drawPath(path)
            p.setBrush(self.DICE)
            for s, v in self.dice:
                p.drawEllipse(dpoint(s, v), 2.5, 2.5)
            if self.best is not None:
                p.setBrush(Qt.BrushStyle.NoBrush)
                p.setPen(QPen(QColor(255, 255, 255), 1.2))
                p.drawEllipse(dpoint(*self.best), 5.0, 5.0)
        p.setPen(text)
        legend = "— loss   "
        p.setPen(self.LOSS)
        p.drawText(QRectF(area.left() + 6, area.top() + 2, 90, 14),
                   int(Qt.AlignmentFlag.AlignLeft), legend)
        p.setPen(self.DICE)
        p.drawText(QRectF(area.left() + 60, area.top() + 2, 160, 14),
                   int(Qt.AlignmentFlag.AlignLeft), "● validation Dice")
        p.end()
