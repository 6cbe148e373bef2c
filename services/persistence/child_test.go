package persistence

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// The crash and takeover tests run persistence instances as real processes (this test
// binary again, with childEnv set), so that SIGKILL ends them at an arbitrary point.
const (
	childEnv     = "QUBESBUS_PERSISTENCE_TEST_CHILD"
	childNATS    = "QUBESBUS_PERSISTENCE_TEST_NATS"
	childDataDir = "QUBESBUS_PERSISTENCE_TEST_DATA_DIR"
	childHost    = "QUBESBUS_PERSISTENCE_TEST_HOST"
	childSeed    = "QUBESBUS_PERSISTENCE_TEST_SEED"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	os.Exit(m.Run())
}

// runChild serves one instance until SIGTERM (then closes it cleanly) or SIGKILL.
// It prints "ready" once it serves.
func runChild() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nc, err := bus.Connect(startCtx, bus.ConnConfig{URL: os.Getenv(childNATS), Name: "persistence-test-child"}, log)
	if err != nil {
		log.Error("connect", "err", err)
		return 2
	}
	s, err := New(Config{Host: subject.ForHost(os.Getenv(childHost)), DataDir: os.Getenv(childDataDir), SeedXML: os.Getenv(childSeed), Log: log})
	if err != nil {
		log.Error("open", "err", err)
		return 2
	}
	if _, err := s.Serve(ctx, nc); err != nil {
		log.Error("serve", "err", err)
		return 2
	}
	fmt.Println(bustest.Ready)
	<-ctx.Done()
	closeCtx, cancelClose := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelClose()
	if err := s.Close(closeCtx); err != nil {
		log.Error("close", "err", err)
		return 1
	}
	_ = nc.Drain()
	return 0
}

// startChild starts an instance in another process and waits until it serves.
func startChild(t *testing.T, natsURL, dataDir, host, seed string) *bustest.Child {
	t.Helper()
	return bustest.StartChild(t, time.Minute, childEnv+"=1", childNATS+"="+natsURL,
		childDataDir+"="+dataDir, childHost+"="+host, childSeed+"="+seed)
}
