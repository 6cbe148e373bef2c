package audit

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

func TestAuditedRule(t *testing.T) {
	read := &rpc.Method{Name: "admin.vm.property.Get", Access: rpc.Read}
	set := &rpc.Method{Name: "admin.vm.property.Set", Access: rpc.Write, ChangesConfig: true}
	start := &rpc.Method{Name: "admin.vm.Start", Access: rpc.Execute}
	backup := &rpc.Method{Name: "admin.backup.Execute", Access: rpc.Execute, ChangesConfig: true}
	cases := []struct {
		m         *rpc.Method
		outcome   string
		exception string
		want      bool
	}{
		{read, OutcomeOK, "", false},
		{read, OutcomeException, "QubesNoSuchPropertyError", false},
		{read, OutcomeAbort, "", false},
		{read, OutcomeException, "PermissionDenied", true},
		{read, OutcomeException, "ProtocolError", true},
		{set, OutcomeOK, "", true},
		{set, OutcomeException, "QubesValueError", true},
		{set, OutcomeAbort, "", true},
		{start, OutcomeOK, "", true},
		{backup, OutcomeOK, "", true},
		{nil, OutcomeException, "QubesVMNotFoundError", true},
		{nil, OutcomeAbort, "", true},
	}
	for _, c := range cases {
		name := "unknown"
		if c.m != nil {
			name = c.m.Name
		}
		if got := Audited(c.m, Record{Outcome: c.outcome, Exception: c.exception}); got != c.want {
			t.Errorf("%s %s %s: audited %v, want %v", name, c.outcome, c.exception, got, c.want)
		}
	}
}

// logSink keeps the messages logged and reports each one on a channel.
type logSink struct {
	mu    sync.Mutex
	lines []string
	seen  chan string
}

func newLogSink() *logSink { return &logSink{seen: make(chan string, 64)} }

func (l *logSink) Enabled(context.Context, slog.Level) bool { return true }
func (l *logSink) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logSink) WithGroup(string) slog.Handler            { return l }
func (l *logSink) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.Key + "=" + a.Value.String())
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, b.String())
	l.mu.Unlock()
	select {
	case l.seen <- r.Message:
	default:
	}
	return nil
}

func (l *logSink) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// waitLog waits until a message is logged.
func (l *logSink) waitLog(t *testing.T, msg string) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case m := <-l.seen:
			if m == msg {
				return
			}
		case <-timeout:
			t.Fatalf("%q was not logged; log:\n%s", msg, l.all())
		}
	}
}

func streamRecords(t *testing.T, js jetstream.JetStream) []Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, StreamName)
	if err != nil {
		t.Fatal(err)
	}
	var out []Record
	for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		var r Record
		if err := json.Unmarshal(m.Data, &r); err != nil {
			t.Fatal(err)
		}
		if m.Header.Get(jetstream.MsgIDHeader) != r.RequestID {
			t.Errorf("record %s stored with message id %q", r.RequestID, m.Header.Get(jetstream.MsgIDHeader))
		}
		if m.Subject != subject.ForHost(r.Host).Audit() {
			t.Errorf("record of %s on %s", r.Host, m.Subject)
		}
		out = append(out, r)
	}
	return out
}

func TestPublisherStoresRecordsInOrder(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := EnsureStream(ctx, js, StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if c := s.CachedInfo().Config; c.MaxAge != DefaultMaxAge || c.MaxBytes != DefaultMaxBytes || c.Storage != jetstream.FileStorage ||
		!c.DenyDelete || !c.DenyPurge || c.Subjects[0] != "qubes.v1.*.audit" {
		t.Fatalf("stream config %+v", c)
	}
	// Settings change; the stream stays.
	if s, err = EnsureStream(ctx, js, StreamConfig{MaxAge: time.Hour, MaxBytes: 1 << 20}); err != nil || s.CachedInfo().Config.MaxAge != time.Hour {
		t.Fatalf("update: %v", err)
	}
	p, err := NewPublisher(nc, PublisherConfig{Host: "lab.1", MaxInFlight: 4})
	if err != nil {
		t.Fatal(err)
	}
	const n = 50
	for i := range n {
		p.Record(Record{Source: "dom0", Method: "admin.vm.feature.Set", Dest: "work", Arg: "f", Outcome: OutcomeOK,
			PayloadLen: i, RequestID: "req-" + string(rune('A'+i))})
	}
	p.Record(Record{Source: "work", Method: "admin.vm.Start", Dest: "work", Outcome: OutcomeException, Exception: "PermissionDenied"})
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if stored, lost := p.Stats(); stored != n+1 || lost != 0 {
		t.Fatalf("stored %d, lost %d", stored, lost)
	}
	recs := streamRecords(t, js)
	if len(recs) != n+1 {
		t.Fatalf("%d records in the stream", len(recs))
	}
	for i, r := range recs[:n] {
		if r.PayloadLen != i || r.Host != "lab.1" || r.Time.IsZero() || r.Time.Location() != time.UTC {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	last := recs[n]
	if last.Exception != "PermissionDenied" || last.RequestID == "" {
		t.Fatalf("last record %+v", last)
	}
	// After Close a record is logged, not stored.
	p.Record(Record{Method: "admin.vm.Kill"})
	if _, lost := p.Stats(); lost != 1 {
		t.Fatalf("a record after Close: lost %d", lost)
	}
}

// TestPublisherWaitsForTheStream: records made while the stream does not exist are
// stored once it does.
func TestPublisherWaitsForTheStream(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sink := newLogSink()
	p, err := NewPublisher(nc, PublisherConfig{Host: "local", Log: slog.New(sink), RetryFor: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	p.Record(Record{Source: "dom0", Method: "admin.vm.Start", Dest: "work", Outcome: OutcomeOK, RequestID: "r1"})
	sink.waitLog(t, "audit stream did not store records; retrying")
	p.Record(Record{Source: "dom0", Method: "admin.vm.Kill", Dest: "work", Outcome: OutcomeOK, RequestID: "r2"})
	if _, err := EnsureStream(ctx, js, StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if stored, lost := p.Stats(); stored != 2 || lost != 0 {
		t.Fatalf("stored %d, lost %d; log:\n%s", stored, lost, sink.all())
	}
	recs := streamRecords(t, js)
	if len(recs) != 2 || recs[0].RequestID != "r1" || recs[1].RequestID != "r2" {
		t.Fatalf("records %+v", recs)
	}
}

// TestPublisherLogsWhatItCannotStore: a full queue, a record never acknowledged and a
// Close that cannot wait each leave the whole record in the log.
func TestPublisherLogsWhatItCannotStore(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	sink := newLogSink()
	p, err := NewPublisher(nc, PublisherConfig{Host: "local", Log: slog.New(sink), Queue: 1, RetryFor: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	p.Record(Record{Method: "admin.vm.Start", RequestID: "sent"})
	sink.waitLog(t, "audit stream did not store records; retrying") // the worker holds "sent"
	p.Record(Record{Method: "admin.vm.Start", RequestID: "queued"})
	p.Record(Record{Method: "admin.vm.Start", RequestID: "overflow"})
	if _, lost := p.Stats(); lost != 1 {
		t.Fatalf("full queue: lost %d", lost)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p.Close(ctx); err == nil {
		t.Fatal("Close returned nil with records it could not store")
	}
	if stored, lost := p.Stats(); stored != 0 || lost != 3 {
		t.Fatalf("stored %d, lost %d", stored, lost)
	}
	log := sink.all()
	for _, id := range []string{"sent", "queued", "overflow"} {
		if !strings.Contains(log, `"request_id":"`+id+`"`) {
			t.Errorf("record %s not in the log:\n%s", id, log)
		}
	}
	if !strings.Contains(log, "audit queue full") {
		t.Errorf("no reason for the overflow:\n%s", log)
	}
}
