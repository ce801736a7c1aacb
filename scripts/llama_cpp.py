"""Build llama.cpp's benchmark tools (``llama-bench``, ``llama-quantize``, ``llama-imatrix``) from the
llama-cpp-python sdist on PyPI (its ``vendor/llama.cpp``), for bench/generate.py.

An optional benchmark extra (``make llama-cpp``), never a dependency of hhtld:
the sdist is fetched with pip, unpacked and built with CMake (CPU only, a few
minutes on 2 cores) into ``.cache/llama.cpp`` (ignored by git). Then the
converter's one extra need (sentencepiece) is installed when missing, and the
SmolLM2 folder of ``make llm`` is converted with llama.cpp's own
``convert_hf_to_gguf.py`` (F16) and quantised to Q4_0, Q4_K_M and Q8_0.
Returns at once when everything is there.

    python scripts/llama_cpp.py [--cache .cache] [--jobs 2]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


def run(cmd: list[str], **kw) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".cache", help="folder for the sdist, the build and the GGUF files")
    ap.add_argument("--model", default=None, help="the Hugging Face folder (default: CACHE/smollm2-135m-instruct)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    root = cache / "llama.cpp"
    model = Path(args.model) if args.model else cache / "smollm2-135m-instruct"
    bin_dir = root / "build" / "bin"
    tools = {t: bin_dir / t for t in ("llama-bench", "llama-quantize", "llama-imatrix")}
    try:
        if not all(p.exists() for p in tools.values()):
            sdist_dir = root / "sdist"
            sdist_dir.mkdir(parents=True, exist_ok=True)
            found = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
            if not found:
                run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps",
                     "-d", sdist_dir])
                found = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
            src = root / "src"
            if not (src / "CMakeLists.txt").exists():
                with tarfile.open(found[-1]) as tf:
                    top = tf.getnames()[0].split("/")[0]
                    members = [m for m in tf.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
                    tf.extractall(root / "unpack", members=members, filter="data")
                if src.exists():
                    shutil.rmtree(src)
                shutil.move(str(root / "unpack" / top / "vendor" / "llama.cpp"), src)
                shutil.rmtree(root / "unpack")
            build = root / "build"
            run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"])
            run(["cmake", "--build", build, "--config", "Release", "-j", str(args.jobs), "--target", *tools])
        ggufs = root / "gguf"
        ggufs.mkdir(parents=True, exist_ok=True)
        f16 = ggufs / "smollm2-135m-f16.gguf"
        if not f16.exists():
            if importlib.util.find_spec("sentencepiece") is None:  # convert_hf_to_gguf.py imports it for Llama
                run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"])
            if not model.is_dir():
                print(f"llama_cpp: error: {model} is not a folder; run make llm first", file=sys.stderr)
                return 1
            run([sys.executable, root / "src" / "convert_hf_to_gguf.py", model, "--outtype", "f16", "--outfile", f16])
        for q in QUANTS:
            out = ggufs / f"smollm2-135m-{q}.gguf"
            if not out.exists():
                run([tools["llama-quantize"], f16, out, q])
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
        print(f"llama_cpp: error: {e}", file=sys.stderr)
        return 1
    print(f"llama.cpp tools in {bin_dir}; GGUF files: {', '.join(sorted(glob.glob(str(ggufs / '*.gguf'))))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
