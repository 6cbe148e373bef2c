# qubesbus: `make run` serves ./run/qubesd.sock; `make test` runs every check.
MODULES := bus schemas services/gateway services/persistence services/properties services/vmlifecycle cmd/qubesbus
GO      ?= go
FUZZTIME ?= 30s
RUN_DIR ?= run
QUBES_XML ?= testdata/qubes.xml

.PHONY: run test vet build bench fuzz standalone tidy cluster-test clean

run:
	$(GO) run ./cmd/qubesbus run --socket $(RUN_DIR)/qubesd.sock --data-dir $(RUN_DIR)/data --qubes-xml $(QUBES_XML)

build:
	mkdir -p bin && $(GO) build -o bin/qubesbus ./cmd/qubesbus

vet:
	@for m in $(MODULES); do echo "vet $$m"; (cd $$m && $(GO) vet ./...) || exit 1; done

test: vet standalone
	@for m in $(MODULES); do echo "test $$m"; (cd $$m && $(GO) test -race -count=1 ./...) || exit 1; done

# Every module also builds on its own, outside the workspace.
standalone:
	@for m in $(MODULES); do (cd $$m && GOWORK=off $(GO) build ./...) || exit 1; done

# Separate processes on a 3-node nats-server cluster, faults under load (about 2 min).
cluster-test:
	cd cmd/qubesbus && QUBESBUS_CLUSTER_TEST=1 $(GO) test -count=1 -v -timeout 15m -run '^TestClusterFaults$$' ./internal/clustertest/

# After changing imports: keep every module's go.sum complete for GOWORK=off builds.
tidy:
	@for m in $(MODULES); do (cd $$m && GOWORK=off $(GO) mod tidy) || exit 1; done

# Go benchmarks of every module, then the load tool's table (calls/s, p50, p99,
# allocations per call, ratio to the bare NATS + socket floor).
BENCH_ARGS ?= --duration 3s --clients 1,32 --qubes 0,1000,9990 --subscribers 1,10,100
bench:
	@for m in $(MODULES); do (cd $$m && $(GO) test -run '^$$' -bench . -benchmem ./...) || exit 1; done
	$(GO) run ./cmd/qubesbus bench $(BENCH_ARGS)

# Each fuzz target runs FUZZTIME (30 s by default).
fuzz:
	cd bus && $(GO) test -run '^$$' -fuzz '^FuzzEscapeToken$$' -fuzztime $(FUZZTIME) ./subject/
	cd services/gateway && $(GO) test -run '^$$' -fuzz '^FuzzDecodeRequest$$' -fuzztime $(FUZZTIME) .
	cd services/persistence && $(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./qubesxml/
	cd services/properties && $(GO) test -run '^$$' -fuzz '^FuzzSet$$' -fuzztime $(FUZZTIME) ./model/
	cd services/properties && $(GO) test -run '^$$' -fuzz '^FuzzSanitiseNotes$$' -fuzztime $(FUZZTIME) .

clean:
	rm -rf bin $(RUN_DIR)
