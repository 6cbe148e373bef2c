package persistence

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

func openStore(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(Config{Host: subject.ForHost("t"), DataDir: dir, SeedXML: "testdata/qubes.xml"}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s, filepath.Join(dir, "qubes.xml")
}

func TestApplyFollowAndSave(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	store, path := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svc, err := store.Serve(ctx, nc, "0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()

	other := bustest.Connect(t, ns)
	rep, err := Follow(ctx, other, subject.ForHost("t"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	client := Client{NC: other, Host: subject.ForHost("t")}
	before, _ := os.ReadFile(path)
	rev, err := client.Apply(ctx, config.Mutation{Ops: []config.Op{{Kind: config.OpSetProperty, Domain: "domain-3", Name: "memory", Value: "500"}}})
	if err != nil {
		t.Fatal(err)
	}
	if store.Writes() != 0 {
		t.Fatalf("a mutation without ChangesConfig wrote qubes.xml")
	}
	if err := rep.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
	var got string
	rep.View(func(c *config.Config) {
		for _, d := range c.Domains {
			if d.ID == "domain-3" {
				got, _ = d.Property("memory")
			}
		}
	})
	if got != "500" {
		t.Fatalf("replica memory = %q", got)
	}
	// A stale revision and a dangling reference are rejected and change nothing.
	if _, err := client.Apply(ctx, config.Mutation{ExpectRevision: rev - 1}); !errors.Is(err, config.ErrStaleRevision) {
		t.Fatalf("stale apply: %v", err)
	}
	if _, err := client.Apply(ctx, config.Mutation{Ops: []config.Op{{Kind: config.OpSetProperty, Domain: "domain-3", Name: "netvm", Value: "nosuch"}}}); !errors.Is(err, ErrRejected) {
		t.Fatalf("dangling netvm: %v", err)
	}
	if _, err := client.Apply(ctx, config.Mutation{ChangesConfig: true, Ops: []config.Op{{Kind: config.OpAddTag, Domain: "domain-3", Name: "t1"}}}); err != nil {
		t.Fatal(err)
	}
	if store.Writes() != 1 {
		t.Fatalf("writes = %d, want 1", store.Writes())
	}
	after, _ := os.ReadFile(path)
	if string(after) == string(before) {
		t.Fatal("qubes.xml unchanged after a config change")
	}
}

func TestOpenRejectsCorruptFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "qubes.xml")
	bad := []byte("<qubes>\n  <labels>\n    <label id=\"label-1\" color=\"0xcc0000\">red</label>\n  <domains>\n")
	if err := os.WriteFile(path, bad, 0o660); err != nil {
		t.Fatal(err)
	}
	_, err := Open(Config{DataDir: dir}, slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatal("corrupt qubes.xml accepted")
	}
	if msg := err.Error(); !strings.Contains(msg, path) {
		t.Fatalf("error %q does not name the file", msg)
	}
	if after, _ := os.ReadFile(path); string(after) != string(bad) {
		t.Fatal("corrupt file was modified")
	}
}

