# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch is named in the same pip call so pip takes the CPU wheel instead of pulling CUDA builds.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint architectures docs bench base world-base self-distill clean

$(BIN)/lightning-mtp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev]"
	touch $@

install: $(BIN)/lightning-mtp

# The main job: fit FastMTP on the shipped tiny-math base, then bench it against HF greedy and plain NTP.
demo: install
	$(BIN)/lightning-mtp fit --config recipes/tiny-math/fast_mtp.yaml --trainer.default_root_dir runs/demo \
		--trainer.logger.init_args.save_dir runs/demo --trainer.callbacks.init_args.dirpath runs/demo/tiny-math-fastmtp
	$(BIN)/lightning-mtp bench --model runs/demo/tiny-math-fastmtp --prompts tiny-math --n 50 --json runs/demo/bench.json

# mkdocs --strict: a broken link, a missing page or an API reference that no longer resolves fails the build.
# (Not --quiet: it hides the warnings that --strict counts.) Its log is shown only when the build fails.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
MKDOCS_QUIET := log=$$($(MKDOCS) 2>&1) || { echo "$$log"; exit 1; }

# The suite runs on every core (pytest-xdist): the architecture sweep alone is minutes of CPU.
test: install
	$(BIN)/ruff check lightning_mtp tests
	@$(MKDOCS_QUIET)
	$(BIN)/python -m pytest -n auto

lint: install
	$(BIN)/ruff check lightning_mtp tests

# The architecture support matrix (docs/architectures.md): every causal LM transformers registers, every method,
# greedy / batched / sampled (tests/arch_sweep.py; tests/test_architectures.py checks the page is current).
architectures: install
	$(BIN)/python -W ignore -m tests.arch_sweep --write docs/architectures.md

# The documentation site (MkDocs Material, API reference from the docstrings) in site/.
docs: install
	$(MKDOCS)

# Re-create the shipped tiny-math base from scratch (about an hour on 2 CPU cores).
base: install
	$(BIN)/python -m lightning_mtp.data.tokenizer recipes/tiny-math/base-init
	$(BIN)/lightning-mtp fit --config recipes/tiny-math/base.yaml

# Re-create the shipped tiny-world base from scratch (about two hours on 2 CPU cores; docs/tiny_world.md).
world-base: install
	$(BIN)/python -m lightning_mtp.data.tiny_world init recipes/tiny-world/base-init
	$(BIN)/lightning-mtp fit --config recipes/tiny-world/base.yaml

# Re-create the self-distilled answers the head recipes train on, shipped beside each base: tiny-math's for
# recipes/tiny-math/fast_mtp.yaml (zoo/tiny-math-base/), tiny-world's for every tiny-world head recipe
# (zoo/tiny-world-base/); generated into ~/.cache/lightning-mtp/distill first, unless a fit already did.
self-distill: install
	$(BIN)/python -m lightning_mtp.data.datamodule recipes/tiny-math/fast_mtp.yaml recipes/tiny-world/fast_mtp.yaml

# Both worlds: tiny-math (every shipped method, peers) and tiny-world (per domain, plus off-distribution prompts).
bench: install
	$(BIN)/lightning-mtp bench --model tiny-math-fastmtp --model tiny-math-mtpd --model tiny-math-mtpd-loop8 \
		--model tiny-math-mask-token --n 50 --repeats 3 --threads 1 \
		--json benchmarks/tiny-math.json --markdown benchmarks/tiny-math.md --plots benchmarks/plots
	$(BIN)/lightning-mtp bench --model tiny-world-fastmtp --model tiny-world-mtpd \
		--prompts tiny-world,benchmarks/prompts/tiny-world-off.jsonl --n 20 --max-new-tokens 96 --batch-size 1 \
		--threads 1 --constant-schedule \
		--json benchmarks/tiny-world.json --markdown benchmarks/tiny-world.md --plots benchmarks/plots/tiny-world
	$(BIN)/lightning-mtp bench --model tiny-math-fastmtp --model tiny-math-mtpd --model tiny-math-mask-token \
		--prompts benchmarks/prompts/tiny-math-off.jsonl,tiny-math --n 24 --max-new-tokens 64 --batch-size 1 \
		--threads 1 --constant-schedule --no-peers --json benchmarks/tiny-math-off.json --markdown benchmarks/tiny-math-off.md

clean:
	rm -rf runs lightning_logs .pytest_cache
