"""A reader of ``.hhtld`` packs written from docs/format.md alone: numpy,
ml_dtypes and safetensors' ``safe_open``, nothing of hhtld. The tests hold
hhtld's decode to it (tests/test_docs.py), and the fuzzer (bench/fuzz.py)
judges every crafted pack that hhtld accepts by it: such a pack must decode
to exactly what the format says it holds. Slow on purpose: one row at a time.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import ml_dtypes  # also lets safetensors' numpy backend return BF16 arrays
import numpy as np
from safetensors import safe_open


def _f32(a: np.ndarray) -> np.ndarray:
    """A stored float array as float32; BF16 is the upper half of a float32."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


@lru_cache(maxsize=16)
def _hadamard(b: int) -> np.ndarray:
    i = np.arange(b)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return np.where(parity == 1, -1.0, 1.0).astype(np.float32)  # H[i, j] = (-1)^popcount(i & j)


class DocReader:
    """Decodes rows of a pack with nothing but docs/format.md, numpy and safe_open."""

    def __init__(self, path: Path):
        self.f = safe_open(str(path), "numpy")
        meta = self.f.metadata()
        text = meta["hhtld.manifest"]
        assert meta["format"] == "hhtld" and meta["format_version"] == "2"
        assert meta["hhtld.digest"] == "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.m = json.loads(text)

    def group_part(self, gi: int, part: str) -> np.ndarray:
        return self.f.get_tensor(f"__group__.{gi:04d}::{part}")

    def row(self, name: str, r: int) -> np.ndarray:
        t = self.m["tensors"][name]
        gi = t["group"]
        g = self.m["groups"][gi]
        params = g["params"]
        cols = t["row_shape"][1]
        part = lambda p: self.f.get_tensor(f"{name}::{p}")  # noqa: E731
        if g["codec_id"] == 1:  # hhtl-f32
            x = _f32(self.group_part(gi, "palette"))[int(part("twig")[r])]
        elif g["codec_id"] == 2:  # hhtl-d
            slot_d = int(part("entry")[r, 0])
            v = self.group_part(gi, "palette17")[(slot_d >> 2) & 0xFF]
            x = v[(np.arange(cols) % 17) * 14 % 17].astype(np.float32) / np.float32(256)
        elif g["codec_id"] == 3:  # hhtl-vq
            x = None
            for s, stage in enumerate(params["stages"].replace(" ", "").split("+")):
                widths = [int(item.split(":")[0]) for item in stage.split(",")]
                W, P = len(widths), sum(widths)
                pals = [_f32(self.group_part(gi, f"palette.{s}.{j}")) for j in range(W)]
                twig = part(f"twig.{s}")[r]
                q = np.concatenate([pals[t % W][int(twig[t])] for t in range(twig.shape[0])])
                assert q.shape == (-(-cols // P) * P,)
                q = q[:cols]
                x = q if x is None else x + q
            if params["gain"]:
                x = x * _f32(part("gain"))[r]
            if params["rotate"]:
                b = params["rotation_block"]
                x = (x.reshape(-1, b) @ _hadamard(b)).reshape(-1) * np.float32(1 / np.sqrt(b))
                x = x * self.group_part(gi, "rotation").astype(np.float32)
        else:
            raise AssertionError(f"codec id {g['codec_id']}")
        if "leaf" in t["parts"]:
            basis = _f32(self.group_part(gi, "basis"))
            c = part("leaf")[r].astype(np.float32) * part("leaf_scale")[0]
            acc = np.zeros(cols, np.float32)
            for lane in range(basis.shape[0]):
                acc += c[lane] * basis[lane]
            x = x + acc
        return x

    def tensor(self, name: str) -> np.ndarray:
        t = self.m["tensors"][name]
        if t["kind"] == "passthrough":
            return self.f.get_tensor(name)
        rows = np.stack([self.row(name, r) for r in range(t["row_shape"][0])])
        a = rows.T if t["transposed"] else rows
        a = a.reshape(t["shape"])
        if t["dtype"] == "F16":
            a = np.clip(a, -65504, 65504)
        return a.astype({"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[t["dtype"]])
