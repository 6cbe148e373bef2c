# qubesbus: `make run` serves ./run/qubesd.sock; `make test` runs every check.
MODULES := bus schemas internal/testhost services/gateway services/persistence services/properties services/storage services/vmlifecycle services/devices services/backup cmd/qubesbus
GO      ?= go
FUZZTIME ?= 30s
RUN_DIR ?= run
QUBES_XML ?= testdata/qubes.xml

SERVICES := $(filter services/%,$(MODULES))

.PHONY: run test vet build bench bench-python fuzz standalone deps gomod tidy cluster-test clean

# Built, then run itself rather than through `go run`, which exits 1 after Ctrl-C
# whatever the program's status: Ctrl-C stops qubesbus cleanly and make exits 0.
run: build
	exec bin/qubesbus run --socket $(RUN_DIR)/qubesd.sock --data-dir $(RUN_DIR)/data --qubes-xml $(QUBES_XML) --nats-port 4222

build:
	mkdir -p bin && $(GO) build -o bin/qubesbus ./cmd/qubesbus

# each runs the command $(1) in every module, going on past a failure, then prints one
# line per module under the heading $(2) and fails if any module failed.
define each
@status=0; summary=""; \
for m in $(MODULES); do \
	echo "=== $(2) $$m"; \
	if (cd $$m && $(1)); then r="ok  "; else r="FAIL"; status=1; fi; \
	summary="$$summary$$r $$m\n"; \
done; \
printf "\n=== $(2)\n$$summary"; exit $$status
endef

vet:
	$(call each,$(GO) vet ./...,vet)

# Every module also builds on its own, outside the workspace.
standalone:
	$(call each,GOWORK=off $(GO) build ./...,standalone)

# The dependency rule and the go.mod check, then vet, the standalone build and the
# race-enabled tests of every module. A failure does not stop the rest: the summary at the end names what
# failed in each module, and the target fails if anything did.
test:
	@status=0; \
	if $(MAKE) --no-print-directory deps; then summary="ok   deps\n"; else summary="FAIL deps\n"; status=1; fi; \
	if $(MAKE) --no-print-directory gomod; then summary="$$summary""ok   gomod\n"; else summary="$$summary""FAIL gomod\n"; status=1; fi; \
	for m in $(MODULES); do \
		echo "=== test $$m"; failed=""; \
		(cd $$m && $(GO) vet ./...) || failed="$$failed vet"; \
		(cd $$m && GOWORK=off $(GO) build ./...) || failed="$$failed standalone"; \
		(cd $$m && $(GO) test -race -count=1 ./...) || failed="$$failed test"; \
		if [ -z "$$failed" ]; then summary="$$summary""ok   $$m\n"; \
		else summary="$$summary""FAIL $$m ($${failed# })\n"; status=1; fi; \
	done; \
	printf "\n=== summary\n$$summary"; exit $$status

# Services share only bus and schemas: no package of a service, its tests included,
# may import a package of another service. The one way in is internal/testhost, the
# test host whose persistence every service's tests run against. Prints each import
# that crosses into another service.
MODULE_PATH = github.com/qubesbus/qubesbus
# CROSSING reads "package|import|…" lines (go list -f, test variants "pkg [pkg.test]"
# included) and prints each import of a package of another service than own, by a
# package outside that service.
CROSSING = function norm(p) { sub(/ \[.*$$/, "", p); return p } \
	function svc(p, s) { p = norm(p); if (index(p, pre) != 1) return ""; s = substr(p, length(pre) + 1); sub(/\/.*/, "", s); sub(/\.test$$/, "", s); sub(/_test$$/, "", s); return s } \
	{ if (norm($$1) == testhost) next; from = svc($$1); \
	  for (i = 2; i <= NF; i++) { to = svc($$i); if (to != "" && to != own && to != from) print "  " norm($$1) " imports " norm($$i) } }
deps:
	@status=0; \
	for m in $(SERVICES); do \
		own=$${m#services/}; \
		if ! list=$$(cd $$m && $(GO) list -deps -test -f '{{.ImportPath}}|{{join .Imports "|"}}' ./...); then \
			echo "deps: go list failed in $$m"; status=1; continue; \
		fi; \
		bad=$$(printf '%s\n' "$$list" | awk -F'|' -v own="$$own" -v pre="$(MODULE_PATH)/services/" \
			-v testhost="$(MODULE_PATH)/internal/testhost" '$(CROSSING)' | sort -u); \
		if [ -n "$$bad" ]; then echo "deps: $$m depends on another service:"; echo "$$bad"; status=1; fi; \
	done; \
	if [ $$status = 0 ]; then echo "deps: no service depends on another"; fi; \
	exit $$status

# No debris in any go.mod: each is as `go mod tidy` leaves it, with at most one block
# of direct and one of indirect requirements and one replace block, and replaces only
# modules in its build list.
gomod:
	@status=0; \
	for m in $(MODULES); do \
		f=$$m/go.mod; \
		if ! (cd $$m && GOWORK=off $(GO) mod tidy -diff >/dev/null); then echo "gomod: $$m is not tidy (make tidy)"; status=1; fi; \
		if [ $$(grep -c '^require' $$f) -gt 2 ] || [ $$(grep -c '^replace' $$f) -gt 1 ]; then \
			echo "gomod: $$f has more than two require blocks or more than one replace block"; status=1; fi; \
		all=$$(cd $$m && GOWORK=off $(GO) list -m -f '{{.Path}}' all); \
		for r in $$(sed -n 's/^[[:space:]]*\(replace[[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]\{1,\}\)[^=]*=>.*/\2/p' $$f); do \
			if ! printf '%s\n' "$$all" | grep -qxF "$$r"; then echo "gomod: $$f replaces $$r, which is not in its build list"; status=1; fi; \
		done; \
	done; \
	if [ $$status = 0 ]; then echo "gomod: every go.mod tidy, without debris"; fi; \
	exit $$status

# Separate processes on a 3-node nats-server cluster, faults under load (about 2 min).
cluster-test:
	cd cmd/qubesbus && QUBESBUS_CLUSTER_TEST=1 $(GO) test -count=1 -v -timeout 15m -run '^TestClusterFaults$$' ./internal/clustertest/

# After changing imports: keep every module's go.sum complete for GOWORK=off builds.
tidy:
	@for m in $(MODULES); do (cd $$m && GOWORK=off $(GO) mod tidy) || exit 1; done

# Go benchmarks of every module, then the load tool's table (calls/s, p50, p99,
# allocations per call, ratio to the bare NATS + socket floor), admin.Events latency,
# and property.Get (8 clients) and the qvm-ls shape against the recorded floor.
BENCH_ARGS ?= --duration 3s --clients 1,32 --qubes 0,1000,9990 --subscribers 1,10,100
# Config changes at group-commit speed (issue #17): feature.Set from 8 socket clients at
# 9, 1009 and 9999 qubes, each acknowledged once the change log holds it durably.
BENCH_WRITE_ARGS ?= --duration 5s --clients 8 --qubes 0,1000,9990 --classes feature.Set --subscribers 1 --skip-qvm-ls
bench:
	@for m in $(MODULES); do (cd $$m && $(GO) test -run '^$$' -bench . -benchmem ./...) || exit 1; done
	$(GO) run ./cmd/qubesbus bench $(BENCH_ARGS)
	$(GO) run ./cmd/qubesbus bench $(BENCH_WRITE_ARGS)

# Issue #17's comparison with the Python client of the dom0 tools (qubesadmin), in one
# run: qubesbus over the 1009-qube fixture, the recorded floor (`qubesbus bench
# --serve-floor`) and, given QUBES_CORE_ADMIN_SRC and QUBES_CORE_QREXEC_SRC, the real
# qubesd (../shared/oracle). Needs QUBESADMIN_SRC, an unpacked qubes-core-admin-client
# tree, so it is no part of `make test`. PYBENCH_ARGS: tools/pybench.py's flags.
PYBENCH_ARGS ?=
bench-python: build
	tools/bench-python.sh $(PYBENCH_ARGS)

# Each fuzz target runs FUZZTIME (30 s by default).
fuzz:
	cd bus && $(GO) test -run '^$$' -fuzz '^FuzzEscapeToken$$' -fuzztime $(FUZZTIME) ./subject/
	cd services/gateway && $(GO) test -run '^$$' -fuzz '^FuzzDecodeRequest$$' -fuzztime $(FUZZTIME) .
	cd schemas && $(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./qubesxml/
	cd schemas && $(GO) test -run '^$$' -fuzz '^FuzzSet$$' -fuzztime $(FUZZTIME) ./model/
	cd services/properties && $(GO) test -run '^$$' -fuzz '^FuzzSanitiseNotes$$' -fuzztime $(FUZZTIME) .
	cd bus && $(GO) test -run '^$$' -fuzz '^FuzzSubjectTokens$$' -fuzztime $(FUZZTIME) ./subject/
	cd bus && $(GO) test -run '^$$' -fuzz '^FuzzServiceEnvelope$$' -fuzztime $(FUZZTIME) ./rpc/
	cd services/storage && $(GO) test -run '^$$' -fuzz '^FuzzSimKey$$' -fuzztime $(FUZZTIME) .
	cd schemas && $(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./firewall/
	cd bus && $(GO) test -run '^$$' -fuzz '^FuzzJSONString$$' -fuzztime $(FUZZTIME) ./cloudevent/

clean:
	rm -rf bin $(RUN_DIR)
