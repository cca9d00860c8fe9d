# EdgeFleet: every target sets itself up from a fresh clone (venv in .venv, torch 2.13.0 first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install test demo demo-console demo-photos bench lint mosquitto nats-server systemd chromium broker-plugin ha-venv clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[trainer,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
		{ echo "installing mosquitto with apt-get"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q mosquitto; }

# The clustered broker tier's tests (tests/test_nats_cluster.py, deploy/nats): Debian's nats-server 2.9.
nats-server:
	@command -v nats-server >/dev/null 2>&1 || test -x /usr/sbin/nats-server || \
		{ echo "installing nats-server with apt-get"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nats-server; }

# systemd-analyze for tests/test_systemd_units.py (verify and security of deploy/systemd/*.service).
systemd:
	@command -v systemd-analyze >/dev/null 2>&1 || test -x /usr/bin/systemd-analyze || \
		{ echo "installing systemd (systemd-analyze) with apt-get"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q systemd; }

# Debian's Chromium for the console's browser tests (Playwright drives it; no browser download).
chromium:
	@test -x /usr/bin/chromium || \
		{ echo "installing chromium with apt-get"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# The broker guard plugin (deploy/mosquitto/edgefleet_guard.c): the deployed broker config loads it.
GUARD := build/edgefleet_guard.so
broker-plugin: $(GUARD)

$(GUARD): deploy/mosquitto/edgefleet_guard.c
	@test -f /usr/include/mosquitto_plugin.h -a -f /usr/include/mosquitto.h -a -f /usr/include/openssl/x509.h \
		&& command -v gcc >/dev/null || \
		{ echo "installing gcc, mosquitto-dev, libmosquitto-dev and libssl-dev with apt-get"; \
		  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q gcc mosquitto-dev libmosquitto-dev libssl-dev; }
	mkdir -p build
	gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -lcrypto

# CPUID masking (tools/cpuid_mask): the export and benches measure int8 on the kernels a CPU without
# AVX-512/VNNI runs, on this one. Built only where the CPU can fault on CPUID (x86 Linux, `cpuid_fault`).
CPUID_MASK := build/cpuid_mask.so
cpuid-mask: $(CPUID_MASK)

$(CPUID_MASK): tools/cpuid_mask/cpuid_mask.c
	mkdir -p build
	@if grep -qw cpuid_fault /proc/cpuinfo 2>/dev/null; then \
		gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $<; \
	else echo "no cpuid_fault on this CPU: int8 is measured on its own kernels only"; fi

# Home Assistant for the discovery test, in a virtualenv of its own (its MQTT integration pins
# paho-mqtt 1.6.1; 2024.3.3 is the last release for Python 3.11).
HA_VENV := build/ha-venv
ha-venv: $(HA_VENV)/bin/hass

$(HA_VENV)/bin/hass:
	$(PY) -m venv $(HA_VENV)
	$(HA_VENV)/bin/pip install -q --disable-pip-version-check homeassistant==2024.3.3 paho-mqtt==1.6.1 janus==1.0.0

test: $(STAMP) mosquitto nats-server systemd chromium $(GUARD) $(CPUID_MASK) $(HA_VENV)/bin/hass
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

demo: $(STAMP) mosquitto $(CPUID_MASK)
	$(BIN)/edgefleet demo

# The demo, then its console stays up (URL and login printed) until Ctrl-C.
demo-console: $(STAMP) mosquitto
	$(BIN)/edgefleet demo --console

demo-photos: $(STAMP) mosquitto
	$(BIN)/python -m trainer.sim.demo_photos

bench: $(STAMP) mosquitto $(CPUID_MASK)
	$(BIN)/python -m bench.run

# Style, types, the import contract (pyproject.toml [tool.importlinter]) and function lengths.
lint: $(STAMP)
	$(BIN)/ruff check edge_agent trainer tests bench tools
	$(BIN)/ruff format --check edge_agent trainer tests bench tools
	$(BIN)/mypy edge_agent trainer
	$(BIN)/lint-imports
	$(BIN)/python tools/function_length.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
