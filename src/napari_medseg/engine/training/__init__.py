"""Training wing: datasets, augmentation, losses, training, fine-tuning, lineage, evaluation.

Fine-tuning reads in steps: :mod:`.changes` (what the user changed), :mod:`.corrections`
(the samples cut from it), :mod:`.replay` (earlier samples against forgetting),
:mod:`.finetune` (the loop) and :mod:`.workflow` (the one workflow the widget and the CLI run:
autosave, replay store, active checkpoint). :mod:`.losses` holds one module per network family.

May use :mod:`napari_medseg.engine.inference` (validation runs the tiled engine); the
inference wing never imports this one. Callers import the submodule they need.
"""

__all__: list[str] = []
