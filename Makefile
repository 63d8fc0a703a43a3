# The targets are the README's commands. Each sets up what it needs (virtualenv, packages, Kafka jars).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROUNDS ?= 20

CACHE := $(or $(PAYSTREAM_CACHE),$(HOME)/.cache/paystream)

.PHONY: demo test unit lint tools chaos bench simulator images test-images clean

# The runtime (src/paystream) and its tooling (tooling/: the local infrastructure, simulator, demo
# and bench), both editable.
$(STAMP): pyproject.toml tooling/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]' -e ./tooling
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/paystream demo

lint: $(STAMP)
	$(BIN)/ruff check src tooling tests
	$(BIN)/ruff format --check src tooling tests
	$(BIN)/mypy

# The Go tools the tests use (Toxiproxy, promtool), built once from their modules into the cache.
tools: $(STAMP)
	$(BIN)/python -m paystream_tooling.devenv.gotools $(CACHE)

# Every test, the fault-injection scenarios included at one seeded round each; then the branch
# coverage of the runtime and the tooling (a figure to read, not a threshold to meet).
test: lint tools
	$(BIN)/python -m pytest -p no:cacheprovider -m "not images" --cov --cov-report= --durations=25
	@echo "branch coverage: $$($(BIN)/coverage report --format=total) % (coverage report: per file)"

# The tests that need neither a broker, a database, Go, root nor the network: seconds, for every
# save. `make test` runs them too.
unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -q -m "not infra and not chaos and not images"

# The fault-injection scenarios alone, ROUNDS randomized rounds each; writes chaos-report.json.
chaos: $(STAMP) tools
	rm -f chaos-report.json
	PAYSTREAM_CHAOS_ROUNDS=$(ROUNDS) PAYSTREAM_CHAOS_RANDOM=1 \
		$(BIN)/python -m pytest -m chaos -p no:cacheprovider; \
		status=$$?; $(BIN)/python -m tests.chaos_report && exit $$status

bench: $(STAMP)
	$(BIN)/paystream bench

simulator: $(STAMP)
	$(BIN)/paystream simulator

# The processor and simulator images, with podman or docker, from wheels built here (no network
# in the build). BASE: the official slim Python image, or, when no registry answers, one made
# from Debian's archive (said in one line).
BASE ?= python:3.11-slim
images: $(STAMP)
	$(BIN)/python -m paystream_tooling.images --base $(BASE) --home $(CACHE)/images

# The demo's corpus through the images, against the project's own Kafka and PostgreSQL: longer
# than make test's line allows, so a target of its own (.ci/run runs it).
test-images: images tools
	$(BIN)/python -m pytest -p no:cacheprovider -m images --timeout 900

clean:
	rm -rf $(VENV) .paystream
