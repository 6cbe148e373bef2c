package changelog

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

func openLog(t *testing.T, host string) (*Log, jetstream.JetStream) {
	t.Helper()
	ns := bustest.RunJetStream(t)
	js, err := jetstream.New(bustest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	l, err := Open(context.Background(), js, subject.ForHost(host), StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return l, js
}

func change(rev uint64) Record {
	return Record{Revision: rev, Change: &Change{Revision: rev, ChangesConfig: rev%2 == 0,
		Ops: []config.Op{{Kind: config.OpAddTag, Domain: "domain-1", Name: "t"}}}}
}

func TestAppendIsConditional(t *testing.T) {
	ctx := context.Background()
	l, js := openLog(t, "a")
	base, err := qubesxml.Load("../../testdata/qubes.xml")
	if err != nil {
		t.Fatal(err)
	}
	s1, err := l.Append(ctx, 0, Record{Revision: 1, Base: base})
	if err != nil {
		t.Fatal(err)
	}
	// A second "first record" loses: the host has one already.
	if _, err := l.Append(ctx, 0, Record{Revision: 1, Base: base}); !errors.Is(err, ErrConflict) {
		t.Fatalf("second base: %v", err)
	}
	s2, err := l.Append(ctx, s1, change(2))
	if err != nil {
		t.Fatal(err)
	}
	// Two writers that both saw s2: one wins.
	if _, err := l.Append(ctx, s2, change(3)); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(ctx, s2, change(3)); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale writer: %v", err)
	}
	// Another host's records do not move this host's sequence.
	other, err := Open(ctx, js, subject.ForHost("b"), StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Append(ctx, 0, change(1)); err != nil {
		t.Fatal(err)
	}
	last, err := l.Last(ctx)
	if err != nil || last != s2+1 {
		t.Fatalf("last = %d, %v; want %d", last, err, s2+1)
	}

	var revs []uint64
	for seq := uint64(0); ; {
		r, err := l.Next(ctx, seq+1)
		if errors.Is(err, ErrEnd) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, r.Revision)
		seq = r.Sequence
		if r.Revision == 1 && !reflect.DeepEqual(r.Base.Clone(), base.Clone()) {
			t.Fatal("base does not round-trip")
		}
		if r.Revision == 2 && (!r.Change.ChangesConfig || len(r.Change.Ops) != 1) {
			t.Fatalf("change 2 = %+v", r.Change)
		}
	}
	if !reflect.DeepEqual(revs, []uint64{1, 2, 3}) {
		t.Fatalf("revisions %v", revs)
	}
	if ok, err := l.Holds(ctx, s2, 2); !ok || err != nil {
		t.Fatalf("holds(s2, 2) = %v, %v", ok, err)
	}
	if ok, _ := l.Holds(ctx, s2, 3); ok {
		t.Fatal("holds a wrong revision")
	}
	if ok, _ := l.Holds(ctx, 999, 3); ok {
		t.Fatal("holds a missing sequence")
	}
}

func TestTailAndCompact(t *testing.T) {
	ctx := context.Background()
	l, _ := openLog(t, "a")
	seq, err := l.Append(ctx, 0, Record{Revision: 1, Base: &config.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Record, 100)
	stop, err := l.Tail(ctx, 0, func(r Record, err error) {
		if err != nil {
			t.Error(err)
		}
		got <- r
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for rev := uint64(2); rev <= 5; rev++ {
		if seq, err = l.Append(ctx, seq, change(rev)); err != nil {
			t.Fatal(err)
		}
	}
	for want := uint64(1); want <= 5; want++ {
		select {
		case r := <-got:
			if r.Revision != want {
				t.Fatalf("tail delivered revision %d, want %d", r.Revision, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("revision %d not delivered", want)
		}
	}
	baseSeq, err := l.Append(ctx, seq, Record{Revision: 5, Base: &config.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Compact(ctx, baseSeq); err != nil {
		t.Fatal(err)
	}
	first, err := l.Next(ctx, 0)
	if err != nil || first.Sequence != baseSeq || first.Base == nil {
		t.Fatalf("first record after compaction: %+v %v", first, err)
	}
}

// Records the follower says it has come without their bodies; the others decoded.
func TestTailSkipsKnownRecords(t *testing.T) {
	ctx := context.Background()
	l, _ := openLog(t, "a")
	seq, err := l.Append(ctx, 0, Record{Revision: 1, Base: &config.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	for rev := uint64(2); rev <= 4; rev++ {
		if seq, err = l.Append(ctx, seq, change(rev)); err != nil {
			t.Fatal(err)
		}
	}
	got := make(chan Record, 100)
	var asked []uint64
	stop, err := l.Tail(ctx, 0, func(r Record, err error) {
		if err != nil {
			t.Error(err)
		}
		got <- r
	}, Known(func(seq, rev uint64) bool {
		asked = append(asked, rev) // one goroutine delivers, in order
		return rev == 1 || rev == 3
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for want := uint64(1); want <= 4; want++ {
		select {
		case r := <-got:
			known := want == 1 || want == 3
			switch {
			case r.Revision != want || r.Sequence == 0:
				t.Fatalf("tail delivered revision %d (sequence %d), want %d", r.Revision, r.Sequence, want)
			case r.Known != known:
				t.Fatalf("revision %d: Known %v, want %v", want, r.Known, known)
			case known && (r.Base != nil || r.Change != nil):
				t.Fatalf("revision %d: a known record came with its body", want)
			case !known && r.Change == nil:
				t.Fatalf("revision %d: no body", want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("revision %d not delivered", want)
		}
	}
	if !reflect.DeepEqual(asked, []uint64{1, 2, 3, 4}) {
		t.Fatalf("Known asked about revisions %v", asked)
	}
}

// TestConflictOnCluster: on a replicated stream the server reports a lost condition
// with another error code (10164); it must still be ErrConflict.
func TestConflictOnCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	servers := bustest.RunCluster(t, 3)
	var logs []*Log
	for _, ns := range servers[:2] {
		js, err := jetstream.New(bustest.Connect(t, ns))
		if err != nil {
			t.Fatal(err)
		}
		var l *Log
		bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
			l, err = Open(ctx, js, subject.ForHost("c"), StreamConfig{Replicas: 3})
			return err
		})
		logs = append(logs, l)
	}
	seq, err := logs[0].Append(ctx, 0, Record{Revision: 1, Base: &config.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := logs[1].Append(ctx, seq, change(2)); err != nil {
		t.Fatal(err)
	}
	if _, err := logs[0].Append(ctx, seq, change(2)); !errors.Is(err, ErrConflict) {
		t.Fatalf("lost append on a replicated stream: %v", err)
	}
	info, err := logs[0].stream.Info(ctx)
	if err != nil || info.Config.Replicas != 3 {
		t.Fatalf("replicas: %+v %v", info, err)
	}
}
