"""``defbench report protocols``: each defense's ACC and ASR under each downstream protocol.

The question it answers: does a defense's ASR depend on how the encoder is used downstream (the MLP probe of
the papers, a linear probe, the kNN monitor of the attacks' training code, fine-tuning the whole encoder)?
The figure shows ASR (bars) and ACC (markers) of the undefended encoder and of each defense, one group per
protocol; the table lists them (means over tasks and seeds) and each row's ASR range over the protocols.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .ablations import ASR_COLOUR, REF_COLOUR, _figure, _legend_below, _mean_by


def _columns(rows: pd.DataFrame) -> pd.DataFrame:
    """The undefended encoder (once per protocol, task and seed) and each defense, as a ``column`` label."""
    undefended = rows[rows.role == "undefended"].drop_duplicates(["arm", "downstream", "seed"])
    defended = rows[rows.role == "defended"]
    return pd.concat([undefended.assign(column="undefended"), defended.assign(column=defended.defense)])


def protocols(rows, asr, meas=None):
    data = _columns(rows)
    means = _mean_by(data, ["column", "arm"], asr)
    order = list(dict.fromkeys(data.arm))
    columns = list(dict.fromkeys(data.column))
    fig, axes = _figure(2, width=5.5)
    x = np.arange(len(columns))
    width = 0.8 / len(order)
    palette = [ASR_COLOUR, "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for ax, metric in zip(axes, ("ASR", "ACC")):
        for i, protocol in enumerate(order):
            part = means[means.arm == protocol].set_index("column").reindex(columns)
            ax.bar(x - 0.4 + width * (i + 0.5), part[metric], width=width * 0.95, alpha=0.75,
                   color=palette[i % len(palette)], label=protocol)
        ax.set_xticks(x, columns, rotation=30, ha="right")
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric} by downstream protocol")
        _legend_below(ax, ncol=len(order), offset=-0.32)
    axes[0].axhline(0, color=REF_COLOUR, linewidth=0.5)
    table = means.pivot(index="column", columns="arm", values=["ACC", "ASR"])
    table.columns = [f"{protocol} {metric}" for metric, protocol in table.columns]
    table = table[[f"{p} {m}" for p in order for m in ("ACC", "ASR")]].reindex(columns)
    asr_cols = [f"{p} ASR" for p in order]
    table["ASR range"] = table[asr_cols].max(axis=1) - table[asr_cols].min(axis=1)
    table = table.reset_index().rename(columns={"column": "encoder"})
    notes = ["ASR range: the largest minus the smallest ASR of a row over the protocols (how much the verdict on "
             "that encoder depends on how it is used downstream)",
             "mlp: the papers' probe; linear: one linear layer, trained like it; knn: weighted vote of the 200 "
             "nearest training features; finetune: the whole encoder and a linear head, short schedule"]
    return fig, table, notes
