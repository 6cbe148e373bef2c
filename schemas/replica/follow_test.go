package replica

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// TestCatchUpWithoutTheConsumer: a replica whose consumer delivers nothing (as while
// JetStream cannot create consumers after a node loss) still reaches a revision a
// caller waits for, by reading the log itself; and records the consumer delivers
// later are not applied twice.
func TestCatchUpWithoutTheConsumer(t *testing.T) {
	ctx := t.Context()
	ns := bustest.RunJetStream(t)
	js, err := jetstream.New(bustest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	host := subject.ForHost("t")
	clog, err := changelog.Open(ctx, js, host, changelog.StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	seq, err := clog.Append(ctx, 0, changelog.Record{Revision: 1, Base: load(t)})
	if err != nil {
		t.Fatal(err)
	}
	// The follower as Follow builds it, but with no consumer at all.
	f := &follower{ctx: ctx, log: slog.New(slog.DiscardHandler), clog: clog, r: New(load(t), 1), seq: seq}
	go f.catchUp()
	var delivered []changelog.Record
	for rev := uint64(2); rev <= 4; rev++ {
		rec := changelog.Record{Revision: rev, Change: &changelog.Change{Revision: rev,
			Ops: []config.Op{{Kind: config.OpAddTag, Domain: "domain-3", Name: "t" + string(rune('0'+rev))}}}}
		if seq, err = clog.Append(ctx, seq, rec); err != nil {
			t.Fatal(err)
		}
		rec.Sequence = seq
		delivered = append(delivered, rec)
	}
	// Without catchUp this waits forever; the bound only turns a hang into a failure.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := f.r.WaitRevision(wctx, 4); err != nil {
		t.Fatal(err)
	}
	// The consumer comes back and delivers the same records: nothing changes.
	for _, rec := range delivered {
		f.onRecord(rec, nil)
	}
	if got := f.r.Revision(); got != 4 {
		t.Fatalf("revision %d after the late records, want 4", got)
	}
	var tags []string
	f.r.View(func(c *config.Config) {
		for _, d := range c.Domains {
			if d.ID == "domain-3" {
				tags = d.Tags
			}
		}
	})
	for _, want := range []string{"t2", "t3", "t4"} {
		if n := slices.Index(tags, want); n < 0 || slices.Index(tags[n+1:], want) >= 0 {
			t.Errorf("tag %s in %v: want it once", want, tags)
		}
	}
	if f.r.hasWaiters() {
		t.Fatal("a waiter is still counted")
	}
}
