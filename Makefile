# shoal: `make setup` prepares a fresh Debian machine (as root); `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DEBIAN_FRONTEND := noninteractive

# runc/crun: OCI runtimes (runsc, gVisor's, is installed by `runsc` below); mmdebstrap: base image; gcc/libc6-dev: the static agent;
# busybox-static: a Python-less test image; iproute2/nftables: networking; conntrack: cutting
# connections when a policy changes; patchelf: `from_registry(add_python=)`;
# skopeo/zstd: registry pulls; docker-registry/apache2-utils (htpasswd): the tests' local registry.
# tmux: the tests of the interactive shell (a real terminal they type into and read); chromium: the dashboard's
# tests (driven by Playwright); curl/openssl: fetching and checking the dashboard's xterm.js (scripts/vendor-xterm).
APT_PACKAGES := runc crun mmdebstrap patchelf gcc libc6-dev busybox-static iproute2 nftables conntrack \
	python3 python3-venv ca-certificates skopeo zstd docker-registry apache2-utils tmux chromium curl openssl

# Packages install without starting services (policy-rc.d answers 101 while apt runs).
NO_SERVICES = made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	printf '\043!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; fi; \
	trap '[ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d' EXIT;

# gVisor needs a runsc of 2024-07 or later (bookworm's own, 2022-12, fails coreutils' statx: decision 0069);
# on bookworm it comes from bookworm-backports, pinned to this one package.
RUNSC_MIN := 0.0~20240729
DEBIAN_MIRROR ?= http://deb.debian.org/debian

.PHONY: setup system runsc venv vendor prepare test lint typecheck bench clean

setup: system venv vendor prepare

system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -q && $(NO_SERVICES) apt-get install -y -q --no-install-recommends $$missing; \
	else echo "system packages: present"; fi
	@# docker-registry is only a test tool: never leave its service (unauthenticated, on :5000) running.
	@if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled docker-registry >/dev/null 2>&1; then \
		systemctl disable --now docker-registry >/dev/null 2>&1 || true; fi
	@$(MAKE) --no-print-directory runsc

runsc:
	@have=$$(dpkg-query -W -f='$${Version}' runsc 2>/dev/null || true); \
	if [ -n "$$have" ] && dpkg --compare-versions "$$have" ge "$(RUNSC_MIN)"; then echo "runsc: $$have"; exit 0; fi; \
	. /etc/os-release; \
	if [ "$$VERSION_CODENAME" = bookworm ]; then \
		echo "deb $(DEBIAN_MIRROR) bookworm-backports main" > /etc/apt/sources.list.d/shoal-bookworm-backports.list; \
		apt-get update -q && $(NO_SERVICES) apt-get install -y -q --no-install-recommends -t bookworm-backports runsc; \
	else apt-get update -q && $(NO_SERVICES) apt-get install -y -q --no-install-recommends runsc; fi

venv: $(BIN)/shoal

$(BIN)/shoal: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,gateway,ray]'
	@touch $@

vendor:
	scripts/vendor-xterm

prepare: venv
	$(BIN)/shoal setup

test: venv vendor
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck:
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
