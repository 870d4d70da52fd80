"""The README of a package: the model card (shipped weights) or the checkpoint's description
(fine-tuned ones), the training data and its terms, the lineage, and the network's card."""

from __future__ import annotations

from ... import resources

__all__ = ["documentation"]


def _network_card(network: str) -> str:
    for folder in resources.model_card_dirs():
        path = folder / f"{network}.md"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return ""


def _metrics(metrics: dict) -> str:
    rows = [f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "none recorded"


def documentation(info, name: str, sample: str, source) -> str:
    """The package's README.md (Markdown)."""
    data = info.training_data or {}
    lines = [
        f"# {name}",
        "",
        f"A `{info.network}` ({info.variant}) network exported by napari-medseg "
        f"{info.plugin_version}. Inputs: 1 x {info.in_channels} x H x W, H and W as the "
        "package's parameterised sizes; outputs: probabilities (see the tensor descriptions).",
        "",
        "## Weights",
        "",
        f"- shipped tag: `{info.tag}`" if info.tag else "- a user's checkpoint",
        f"- weights sha256: `{info.sha256}`",
        f"- fine-tuned from weights with sha256 `{info.parent}`" if info.parent
        else "- trained from scratch (no parent)",
        f"- training data: {source.name if source else data.get('dataset') or 'unknown'}"
        + (f" (data hash `{data['data_hash']}`)" if data.get("data_hash") else ""),
        f"- split: {data.get('split', 'not recorded')}",
        f"- data terms: {source.terms}" if source else
        "- data terms: those of the user's own images",
        f"- working resolution: the image average-pooled by {info.input_downsample}"
        if info.input_downsample > 1 else "- full resolution",
        *([f"- prediction tile: {info.tile} px a side (recorded with the weights: their "
           "validation figures were measured with it)"] if info.tile else []),
        f"- test tensors: cut from napari-medseg's shipped sample `{sample}`",
        "",
        "## Validation metrics",
        "",
        _metrics(info.metrics),
        "",
        "## Opening it in napari-medseg",
        "",
        "`napari-medseg predict IMAGE -o OUT --weights this.zip` or the Segment widget's "
        "checkpoint button load the attached safetensors checkpoint (no code is run).",
        "",
    ]
    card = _network_card(info.network)
    if card:
        lines += ["## The network", "", card.replace("\n# ", "\n### ", 1)]
    return "\n".join(lines) + "\n"
