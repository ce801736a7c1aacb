"""The model card (``README.md``) of a pack's Hugging Face folder.

It says what was compressed, how far (bits per weight, the ratio against bfloat16),
what the compression cost on held-out text — the four gates and the behaviour figures
per kind of text of a ``hhtld verify`` report, with the texts named — how the folder
was made, and how to load it. Without a verify report it says that no behaviour was
measured: the card never shows a figure that was not measured on this pack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._version import __version__
from ..format import HF_PACK_NAME, HF_SOURCE_CARD, HF_WEIGHTS_STANDIN
from ..pack.reader import Pack


def figure(x: float) -> str:
    """How the card writes a measured number: 4 significant digits."""
    return f"{float(x):.4g}"


def percent(x: float) -> str:
    return f"{100 * float(x):.1f}%"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _kinds(report: dict[str, Any]) -> list[str]:
    """Per kind of held-out text: the figures of gate 2 and gate 4."""
    gates = {g["gate"]: g for g in report["gates"]}
    if report["family"] == "causal":
        kinds = gates[4]["measured"].get("kinds") or {}
        if not kinds:
            return []
        rows = [[k, str(v["texts"]), figure(v["kl_mean"]), figure(v["kl_p99"]), figure(v["ppl_a"]),
                 figure(v["ppl_b"]), figure(v["ppl_ratio"]), percent(v["top1"])] for k, v in kinds.items()]
        return _table(["kind of text", "texts", "KL mean (nats)", "KL p99", "perplexity (original)",
                       "perplexity (pack)", "perplexity ratio", "top-1 next token"], rows)
    kinds = gates[2]["measured"].get("kinds") or {}
    if not kinds:
        return []
    rows = [[k, str(v["texts"]), percent(v["top1"]), percent(v["top10"]), figure(v["cos_mean"]),
             figure(v["cos_min"])] for k, v in kinds.items()]
    return _table(["kind of text", "texts", "top-1 retrieval", "top-10 overlap", "embedding cosine (mean)",
                   "embedding cosine (min)"], rows)


def _measured(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["No behaviour was measured for this folder: it was exported without a verify report. "
                "`hhtld verify MODEL PACK --json report.json` measures it on held-out text; "
                "`hhtld export-hf PACK DIR --verify-json report.json` puts it here."]
    out = [f"Measured by `hhtld verify` against the original model on held-out text that the encoder never "
           f"saw: {report['behaviour'].get('texts_source', 'held-out texts')}. "
           f"{'Every gate passed.' if report['passed'] else 'Not every gate passed: see the table.'}", ""]
    rows = [[str(g["gate"]), g["name"], g["value"], g["target"], g["status"]] for g in report["gates"]]
    out += _table(["gate", "what", "measured", "target", ""], rows)
    kinds = _kinds(report)
    if kinds:
        out += ["", "Per kind of held-out text:", ""] + kinds
    return out


def model_card(pack: Pack, config: dict[str, Any], report: dict[str, Any] | None, command: str | None,
               files: list[str]) -> str:
    """The card's Markdown (module docstring); ``config``: the folder's config.json,
    ``files``: the folder's files."""
    src = pack.manifest["source"]
    name = src.get("name") or Path(pack.path).stem
    family = "causal" if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []) else None
    ratio = pack.storage_ratio()
    q = config["quantization_config"]
    cal = pack.manifest.get("calibration")
    made = [f"- encoded by {pack.manifest.get('created_by', 'hhtld')} with the `{pack.manifest['codec']}` codec "
            f"(options: {', '.join(f'{k}={v}' for k, v in sorted(pack.manifest.get('codec_options', {}).items()))})"]
    if cal:
        made.append(f"- calibrated on {cal.get('texts')} calibration texts ({cal.get('tokens')} tokens), "
                    f"error feedback {'on' if cal.get('feedback') else 'off'}"
                    + ("; the row gains tuned after the codes were chosen" if cal.get("tuning") else ""))
    if command:
        made.append(f"- this folder: `{command}`")
    auto = "AutoModelForCausalLM" if family == "causal" else "AutoModel"
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- hhtld",
        "- compressed",
        "---",
        "",
        f"# {name}, compressed by hhtld",
        "",
        f"The weights of `{name}` in one hhtld pack (`{HF_PACK_NAME}`): {figure(q['bits_per_weight'])} bits per "
        f"weight, {ratio:.2f}:1 against bfloat16 ({pack.path.stat().st_size:,} bytes with the side files; the "
        f"original at bfloat16: {pack.source_bf16_bytes:,} bytes). Pack format version {q['format_version']}, "
        f"codec `{q['codec']}`.",
        "",
        "## What the compression cost",
        "",
        *_measured(report),
        "",
        "## How it was made",
        "",
        *made,
        "",
        "## How to load it",
        "",
        "```python",
        "import hhtld.hf  # registers the hhtld quantisation method with transformers",
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "The linear layers stay compressed in memory and are computed from the stored parts "
        "(no dense copy of the weights is made); `pipeline(...)` and, for embedding models, "
        "`SentenceTransformer(...)` work the same way after the import. Without `import hhtld.hf`, "
        f"transformers stops with an error naming `{HF_WEIGHTS_STANDIN}`. `save_pretrained` is refused: "
        "the pack is the saved form. `hhtld inspect`, `hhtld generate` and `hhtld.load` read the pack file "
        "directly (`pip install hhtld`).",
        "",
        "## Files",
        "",
        *[f"- `{f}`" + (" (the source model's own card)" if f == HF_SOURCE_CARD else "") for f in files],
        "",
        f"<!-- written by hhtld {__version__} -->",
        "",
    ]
    return "\n".join(lines)


__all__ = ["figure", "model_card", "percent"]
