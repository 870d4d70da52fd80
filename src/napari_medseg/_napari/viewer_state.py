"""What the dock widgets of one viewer share: the loaded networks and the chosen weights.

One :class:`ViewerState` belongs to one napari viewer (:func:`viewer_state`). The Segment
widget publishes its network, variant and weights choice there (:meth:`ViewerState.choose`,
signal :attr:`ViewerState.weights_changed`) and serves requests to segment with other
weights (:meth:`ViewerState.serve_weights`); the Fine-tune widget reads the choice, loads the
starting network through the shared :class:`ModelCache` and asks for new weights to be used
(:meth:`ViewerState.request_weights`). No widget touches another's Qt widgets.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from psygnal import Signal

from ..errors import WeightsNotFoundError
from .weights_choices import RANDOM_INIT_CLASSES, WeightsChoice

__all__ = ["ModelCache", "ViewerState", "viewer_state"]

#: Handler of "segment with these weights": ``(source, image_name, scope) -> started``.
WeightsHandler = Callable[[str, str | None, str | None], bool]


class ModelCache:
    """Networks loaded from weights choices, least recently used dropped first.

    Args:
        max_models: networks kept loaded.
    """

    def __init__(self, max_models: int = 2) -> None:
        self.max_models = int(max_models)
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._load_lock = threading.Lock()
        #: Held while a network runs or is probed (one user of a network at a time).
        self.model_lock = threading.RLock()

    @staticmethod
    def model_key(choice: WeightsChoice, variant: str, in_channels: int) -> tuple:
        """Cache key of the network a choice loads."""
        if choice.untrained:
            return ("random", choice.network, variant, int(in_channels), RANDOM_INIT_CLASSES)
        return (choice.kind, choice.source)

    def load_model(self, choice: WeightsChoice, variant: str, in_channels: int) -> Any:
        """The network of a weights choice (loaded once, then cached).

        Untrained networks take ``in_channels`` (the image's: 1 or 3) and one sigmoid class;
        they are built from a fixed seed so that repeated runs agree.

        Raises:
            WeightsNotFoundError: a card's weights file is not installed.
            CheckpointError: the weights are corrupt or do not fit the network.
            ModelNotFoundError: an unknown network or variant.
        """
        key = self.model_key(choice, variant, in_channels)
        with self._load_lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        model = _build(choice, variant, in_channels)
        with self._load_lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def cached_models(self) -> list[tuple]:
        """Keys of the loaded networks, least recently used first."""
        return list(self._models)


def _build(choice: WeightsChoice, variant: str, in_channels: int) -> Any:
    if choice.untrained:
        from ..models import create_model
        from ..models.working_resolution import on_input_grid

        # a super-resolution network works on the image's grid, as trained weights do
        return on_input_grid(create_model(choice.network, variant, int(in_channels),
                                          RANDOM_INIT_CLASSES, seed=0))
    if choice.kind == "card" and not choice.installed:
        raise WeightsNotFoundError(
            f"The weights of {choice.source!r} are not installed; choose other weights "
            "or random init.")
    from ..engine.checkpoints import load_checkpoint, resolve_weights

    if choice.kind == "checkpoint":
        model, _ = load_checkpoint(str(choice.source))
    else:
        model, _ = resolve_weights(str(choice.source))
    return model


class ViewerState:
    """The networks and weights choice the dock widgets of one viewer share.

    Attributes:
        models: the loaded networks.
        weights: the weights chosen in the Segment widget (None before it lists them).
        variant: the variant chosen with them (used by untrained networks).
    """

    #: Emitted with the new :class:`~.weights_choices.WeightsChoice` and variant.
    weights_changed = Signal(object, str)

    def __init__(self) -> None:
        self.models = ModelCache()
        self.weights: WeightsChoice | None = None
        self.variant = ""
        self._handler: Callable[[], WeightsHandler | None] | None = None

    def choose(self, weights: WeightsChoice | None, variant: str) -> None:
        """Publish the Segment widget's choice (emits :attr:`weights_changed` on a change)."""
        if (weights, variant) == (self.weights, self.variant):
            return
        self.weights, self.variant = weights, variant
        self.weights_changed.emit(weights, variant)

    def loader(self, in_channels: int) -> Callable[[], Any] | None:
        """A function loading the chosen network for ``in_channels`` image channels (to call
        in a worker), or None when nothing is chosen."""
        if self.weights is None:
            return None
        return functools.partial(self.models.load_model, self.weights, self.variant,
                                 int(in_channels))

    def serve_weights(self, handler: WeightsHandler | None) -> None:
        """Set (or clear, with None) who segments with requested weights.

        Only a weak reference to a bound method is kept, so a widget that went away without
        clearing it neither keeps serving nor keeps the viewer alive.
        """
        if handler is None:
            self._handler = None
        elif hasattr(handler, "__self__"):
            self._handler = weakref.WeakMethod(handler)
        else:
            self._handler = lambda: handler

    def _serving_handler(self) -> WeightsHandler | None:
        return self._handler() if self._handler is not None else None

    @property
    def serving(self) -> bool:
        """True when a widget serves weights requests."""
        return self._serving_handler() is not None

    def request_weights(self, source: str, image_name: str | None = None,
                        scope: str | None = "visible") -> bool:
        """Ask the serving widget to use ``source`` and segment again.

        Returns:
            True when a run started.
        """
        handler = self._serving_handler()
        return bool(handler(source, image_name, scope)) if handler is not None else False


_STATES: weakref.WeakKeyDictionary[Any, ViewerState] = weakref.WeakKeyDictionary()


def viewer_state(viewer: Any) -> ViewerState:
    """The state the dock widgets of ``viewer`` share (made on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = ViewerState()
    return state
