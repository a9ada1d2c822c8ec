# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, compute one small benchmark cell on the embedded data (`defbench demo`)
#   make test   create .venv, install, run the tests
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# PROFILE: demo defaults to ci, bench to tiny; table1 and ablations to paper (PROFILE=tiny on a CPU)
PROFILE ?=
STAMP   := $(VENV)/.installed

.PHONY: install demo test clean-venv table1 ablations bench bench-compare ci-small gpu-check

BASE    := $(VENV)/.installed-base

# the demo needs only defbench itself; the tests add their tools and the ViT/CLIP towers' libraries
$(BASE): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/python -m pip install --quiet -e '.[dev,clip]'
	touch $(STAMP)

install: $(STAMP)

demo: $(BASE)
	$(BIN)/defbench demo --profile $(or $(PROFILE),ci)

# two pytest-xdist workers (TEST_WORKERS=0: one process): on 2 cores they fill the gaps a single process leaves
# (imports, data preparation); each runs torch on 2 threads, as the tests' margins were measured, and
# OMP_WAIT_POLICY=PASSIVE keeps the idle threads of one worker from spinning on the other's cores
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check --quiet .
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

clean-venv:
	rm -rf $(VENV)

# The paper's Table I: the full grid, then the tables (PROFILE=tiny on a CPU; paper needs GPUs and the data)
WORKERS ?= 1
EXECUTOR ?= local
table1: $(STAMP)
	$(BIN)/defbench grid --profile $(or $(PROFILE),paper) --executor $(EXECUTOR) --workers $(WORKERS)
	mkdir -p reports/out
	$(BIN)/defbench table table1 --profile $(or $(PROFILE),paper) --format md -o reports/out/table1.md
	$(BIN)/defbench table table1 --profile $(or $(PROFILE),paper) --format latex -o reports/out/table1.tex
	$(BIN)/defbench table table1 --profile $(or $(PROFILE),paper) --format csv -o reports/out/table1.csv
	$(BIN)/defbench table cost --profile $(or $(PROFILE),paper) --format md -o reports/out/cost.md
	cat reports/out/table1.md

# The paper's other studies (ablations, sweeps, robustness, cost): figures + tables in reports/out/ablations.md
ablations: $(STAMP)
	$(BIN)/defbench report all --profile $(or $(PROFILE),paper) --executor $(EXECUTOR) --workers $(WORKERS) -o reports/out

# Speed: ratios to the plain encoder measured in one run (pytest-benchmark); JSON saved under .benchmarks/
bench: $(STAMP)
	$(BIN)/python -m pytest tests/bench --benchmark-only --benchmark-autosave -q
	$(BIN)/python tests/bench/bench_mimic.py --profile $(or $(PROFILE),tiny)

# Compare the two most recent saved benchmark runs (e.g. before and after a change)
bench-compare: $(STAMP)
	$(BIN)/pytest-benchmark compare $$(ls -t .benchmarks/*/*.json | head -2 | tac) --sort=name --columns=median

# Regression subset: the ci grid (2 attacks x 8 defenses, 2 tasks) against tests/golden/ci-small.<cpu kind>.csv;
# prints what moved and fails if anything moved beyond its seed-spread tolerance.
# GOLDEN_WORKERS stages at once, each at the subset's 2 threads (values identical to one worker): on 2 cores
# they fill the single-threaded gaps of each stage (measured on a fresh store: 1 worker 1,442 s at 118 % CPU,
# 3 workers 799 s at 191 %); OMP_WAIT_POLICY=PASSIVE, as for the tests: without it the waiting threads of three
# workers spin on the two cores (the same subset took longer than one worker)
GOLDEN_WORKERS ?= 4
ci-small: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/defbench golden check --workers $(GOLDEN_WORKERS)

# The GPU path on a CUDA machine (under 8 minutes on one H100): the CUDA test subset, fp32 vs bf16 step ratios at
# width 64 / batch 512, one tiny cell's wall time, the paper grid's estimated GPU-hours per stage kind (docs/gpu.md).
# Refuses in one line without CUDA; `$(BIN)/python tests/bench/gpu_check.py --device cpu --quick` is a dry run.
gpu-check: $(STAMP)
	$(BIN)/python tests/bench/gpu_check.py
