"""PNG plots of a verify report (matplotlib, imported lazily, Agg backend).

* ``row_cosine_<regime>.png`` — histogram of the per-row cosines of one
  regime, with the median and 5th-percentile targets (dashed) and the
  measured median and 5th percentile (solid).
* ``bytes_per_group.png`` — stacked horizontal bars: the bytes of every
  group by category, plus passthrough tensors and header/manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..format import CATEGORIES
from ..errors import OptionsError
from .report import VerifyReport


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: VerifyReport, out_dir: str | os.PathLike) -> list[Path]:
    """Write the PNGs into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionsError(f"{out}: exists and is not a folder; --plots takes a folder")
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written = []
    th = report.thresholds
    for regime, cos in report.row_cosines.items():
        if cos.size == 0:
            continue
        med_t = th[f"{regime}_median"]
        p5_t = th[f"{regime}_p5"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        lo = min(float(cos.min()), p5_t) - 0.02
        ax.hist(cos, bins=np.linspace(max(-1.0, lo), 1.0, 121), color="#4477aa")
        med, p5 = float(np.median(cos)), float(np.percentile(cos, 5))
        ax.axvline(med_t, color="#228833", ls="--", label=f"median target {med_t:g}")
        ax.axvline(p5_t, color="#ee6677", ls="--", label=f"p5 target {p5_t:g}")
        ax.axvline(med, color="#228833", ls="-", label=f"median {med:.3f}")
        ax.axvline(p5, color="#ee6677", ls="-", label=f"p5 {p5:.3f}")
        ax.set_xlabel("cosine(original row, decoded row)")
        ax.set_ylabel("rows")
        ax.set_title(f"gate 1 row fidelity, {regime} regime: {cos.size} rows\n{Path(report.pack).name}")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = out / f"row_cosine_{regime}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    st = report.storage
    labels = [g["key"] for g in st["groups"]] + ["(passthrough)", "(header + manifest)"]
    cats = [c for c in CATEGORIES if c not in ("manifest", "passthrough", "aux_files")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.8))
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    colours = plt.get_cmap("tab10")
    for ci, c in enumerate(cats):
        vals = np.array([g["bytes_by_category"].get(c, 0) for g in st["groups"]] + [0, 0], dtype=float)
        if vals.sum() == 0:
            continue
        ax.barh(y, vals, left=left, color=colours(ci), label=c)
        left += vals
    extra = np.zeros(len(labels))
    extra[-2] = st["total"]["passthrough"]
    extra[-1] = st["total"]["manifest"]
    ax.barh(y, extra, left=left, color="#999999", label="passthrough / header")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes")
    ax.set_title(f"gate 3 storage: {st['ratio']:.2f}:1 vs bf16 ({st['counted_bytes']} bytes counted)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "bytes_per_group.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    kinds = report.behaviour.get("kinds")
    if kinds and report.family == "causal":  # causal LMs: mean and p99 next-token KL of every kind of held-out text, against the target
        names = list(kinds)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 2.2))
        y = np.arange(len(names))
        means = [kinds[k]["kl_mean"] for k in names]
        a1.barh(y, means, color=["#ee6677" if m > th["max_kl"] else "#4477aa" for m in means])
        a1.scatter([kinds[k]["kl_p99"] for k in names], y, color="#222222", marker="|", s=200, label="p99")
        a1.axvline(th["max_kl"], color="#228833", ls="--", label=f"target mean <= {th['max_kl']:g}")
        a1.set_yticks(y, names)
        a1.invert_yaxis()
        a1.set_xscale("log")
        a1.set_xlabel("next-token KL(original || decoded), nats")
        a1.legend(fontsize=8, loc="lower right")
        ratios = [kinds[k]["ppl_ratio"] for k in names]
        a2.barh(y, [r - 1 for r in ratios], color=["#ee6677" if r > th["max_ppl_ratio"] else "#4477aa" for r in ratios])
        a2.axvline(th["max_ppl_ratio"] - 1, color="#228833", ls="--", label=f"target ratio <= {th['max_ppl_ratio']:g}")
        a2.set_yticks(y, names)
        a2.invert_yaxis()
        a2.set_xlabel("perplexity ratio - 1")
        a2.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"gates 2 and 4 per kind of held-out text (they hold on the worst)\n{Path(report.pack).name}")
        fig.tight_layout()
        path = out / "kl_per_kind.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
