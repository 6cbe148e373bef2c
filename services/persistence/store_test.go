package persistence

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

var (
	quiet    = slog.New(slog.DiscardHandler)
	testHost = subject.ForHost("t")
)

const seedXML = "../../testdata/qubes.xml"

// serve opens a store on dir and serves it on a connection of its own until the test
// ends.
func serve(t *testing.T, ns *server.Server, cfg Config) *Store {
	t.Helper()
	if cfg.Host == (subject.Host{}) {
		cfg.Host = testHost
	}
	cfg.Log = quiet
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Serve(ctx, bustest.Connect(t, ns)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(ctx) })
	return s
}

func setMemory(id, v string, changes bool) config.Mutation {
	return config.Mutation{ChangesConfig: changes, Ops: []config.Op{{Kind: config.OpSetProperty, Domain: id, Name: "memory", Value: v}}}
}

func setFeature(id, name, v string) config.Mutation {
	return config.Mutation{ChangesConfig: true, Ops: []config.Op{{Kind: config.OpSetFeature, Domain: id, Name: name, Value: v}}}
}

func feature(c *config.Config, id, name string) (string, bool) {
	for _, d := range c.Domains {
		if d.ID == id {
			for _, f := range d.Features {
				if f.Name == name {
					return f.Value, true
				}
			}
		}
	}
	return "", false
}

func property(c *config.Config, id, name string) string {
	for _, d := range c.Domains {
		if d.ID == id {
			v, _ := d.Property(name)
			return v
		}
	}
	return ""
}

// domainIDs of the fixture, for spreading writes.
var domainIDs = []string{"domain-1", "domain-2", "domain-3", "domain-4", "domain-5", "domain-6", "domain-7", "domain-8"}

func TestApplyFollowAndSave(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	store := serve(t, ns, Config{DataDir: dir, SeedXML: seedXML})
	path := filepath.Join(dir, "qubes.xml")
	ctx := t.Context()

	other := bustest.Connect(t, ns)
	rep, err := replica.Follow(ctx, other, testHost, quiet)
	if err != nil {
		t.Fatal(err)
	}
	client := configstore.Client{NC: other, Host: testHost, Caller: configstore.Operator}
	before, _ := os.ReadFile(path)
	rev, err := client.Apply(ctx, setMemory("domain-3", "500", false))
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
	rep.View(func(c *config.Config) { got = property(c, "domain-3", "memory") })
	if got != "500" {
		t.Fatalf("replica memory = %q", got)
	}
	// A stale revision and a dangling reference are rejected and change nothing.
	if _, err := client.Apply(ctx, config.Mutation{ExpectRevision: rev - 1}); !errors.Is(err, config.ErrStaleRevision) {
		t.Fatalf("stale apply: %v", err)
	}
	_, err = client.Apply(ctx, config.Mutation{Ops: []config.Op{{Kind: config.OpSetProperty, Domain: "domain-3", Name: "netvm", Value: "nosuch"}}})
	if !errors.Is(err, configstore.ErrRejected) || !errors.Is(err, config.ErrDanglingRef) {
		t.Fatalf("dangling netvm: %v", err)
	}
	if store.Revision() != rev {
		t.Fatalf("revision %d after refused calls, want %d", store.Revision(), rev)
	}
	rev, err = client.Apply(ctx, config.Mutation{ChangesConfig: true, Ops: []config.Op{{Kind: config.OpAddTag, Domain: "domain-3", Name: "t1"}}})
	if err != nil {
		t.Fatal(err)
	}
	// The write follows the reply, in the background.
	if err := store.WaitWritten(ctx, rev); err != nil {
		t.Fatal(err)
	}
	if store.Writes() != 1 {
		t.Fatalf("writes = %d, want 1", store.Writes())
	}
	after, _ := os.ReadFile(path)
	if string(after) == string(before) {
		t.Fatal("qubes.xml unchanged after a config change")
	}
	m, err := client.Metrics(ctx)
	if err != nil || m.Writes != 1 || m.Revision != rev || m.Written != rev {
		t.Fatalf("metrics %+v, %v", m, err)
	}
}

// TestOpenRejectsBadFile: a corrupt or truncated qubes.xml stops the start with an
// error naming the file and line, and the file stays as it was.
func TestOpenRejectsBadFile(t *testing.T) {
	fixture, err := os.ReadFile(seedXML)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		content  []byte
		wantLine int
	}{
		{"corrupt", []byte("<qubes>\n  <labels>\n    <label id=\"label-1\" color=\"0xcc0000\">red</label>\n  <domains>\n"), 0},
		{"truncated", fixture[:len(fixture)/2], 0},
		{"unknown class", []byte(strings.Replace(string(fixture), `class="AppVM"`, `class="NoSuchVM"`, 1)), 0},
		{"empty", nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "qubes.xml")
			if err := os.WriteFile(path, tt.content, 0o660); err != nil {
				t.Fatal(err)
			}
			_, err := New(Config{DataDir: dir, SeedXML: seedXML, Log: quiet})
			var se *qubesxml.SyntaxError
			if !errors.As(err, &se) || se.Line < 1 {
				t.Fatalf("error %v: want a qubesxml.SyntaxError with a line", err)
			}
			if want := fmt.Sprintf("%s:%d:", path, se.Line); !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not name %q", err, want)
			}
			if tt.wantLine != 0 && se.Line != tt.wantLine {
				t.Fatalf("line %d, want %d", se.Line, tt.wantLine)
			}
			if after, _ := os.ReadFile(path); string(after) != string(tt.content) {
				t.Fatal("bad file was modified")
			}
			if _, err := os.Stat(path + ".rev"); !errors.Is(err, os.ErrNotExist) {
				t.Fatal("a marker was written for a bad file")
			}
		})
	}
}

// TestReadsDoNotWrite: 1 000 snapshot and read calls, from 10 clients at once, write
// qubes.xml zero times.
func TestReadsDoNotWrite(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	store := serve(t, ns, Config{DataDir: dir, SeedXML: seedXML})
	path := filepath.Join(dir, "qubes.xml")
	before, _ := os.Stat(path)
	ctx := t.Context()
	client := configstore.Client{NC: bustest.Connect(t, ns), Host: testHost, Caller: configstore.Operator}
	var wg sync.WaitGroup
	var calls atomic.Int64
	for w := range 10 {
		wg.Go(func() {
			for i := range 100 {
				var err error
				switch (w + i) % 4 {
				case 0, 1:
					var snap Snapshot
					snap, err = client.Snapshot(ctx)
					if err == nil && len(snap.Config.Domains) != 9 {
						err = fmt.Errorf("snapshot with %d domains", len(snap.Config.Domains))
					}
				case 2:
					_, err = client.Metrics(ctx)
				case 3:
					_ = store.Snapshot()
				}
				if err != nil {
					t.Error(err)
					return
				}
				calls.Add(1)
			}
		})
	}
	wg.Wait()
	if err := store.Save(); err != nil { // nothing changed: a shutdown save writes nothing either
		t.Fatal(err)
	}
	after, _ := os.Stat(path)
	t.Logf("%d read calls, %d qubes.xml writes", calls.Load(), store.Writes())
	if calls.Load() != 1_000 || store.Writes() != 0 || !after.ModTime().Equal(before.ModTime()) {
		t.Fatalf("%d calls, %d writes, mtime %v → %v", calls.Load(), store.Writes(), before.ModTime(), after.ModTime())
	}
}

// TestConcurrentChangesCoalesce: 200 concurrent property changes from 20 clients, on
// the 1009-qube fixture (a 1.2 MB qubes.xml), all reach qubes.xml, in at most 200
// writes (group commit makes it far fewer).
func TestConcurrentChangesCoalesce(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	store := serve(t, ns, Config{DataDir: dir, SeedXML: "../../testdata/qubes-1000.xml"})
	domains := store.Snapshot().Config.Domains
	target := func(c, i int) string { return domains[1+c*10+i].ID } // one qube per change
	ctx := t.Context()
	start := time.Now()
	var wg sync.WaitGroup
	for c := range 20 {
		client := configstore.Client{NC: bustest.Connect(t, ns), Host: testHost, Caller: configstore.Operator}
		wg.Go(func() {
			for i := range 10 {
				if _, err := client.Apply(ctx, setMemory(target(c, i), fmt.Sprint(5000+c*10+i), true)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	// The writes follow the replies, in the background.
	if err := store.WaitWritten(ctx, 201); err != nil {
		t.Fatal(err)
	}
	writes := store.Writes()
	t.Logf("200 concurrent ChangesConfig property changes from 20 clients: %d qubes.xml writes in %v",
		writes, time.Since(start).Round(time.Millisecond))
	if writes == 0 || writes > 200 {
		t.Fatalf("%d writes", writes)
	}
	onDisk, _, err := loadCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	for c := range 20 {
		for i := range 10 {
			if got, want := property(onDisk, target(c, i), "memory"), fmt.Sprint(5000+c*10+i); got != want {
				t.Fatalf("qubes.xml: %s memory = %q, want %q", target(c, i), got, want)
			}
		}
	}
	if store.Revision() != 201 {
		t.Fatalf("revision %d, want 201", store.Revision())
	}
}

// TestRestartReplaysLog: changes acknowledged but not in qubes.xml (no ChangesConfig,
// or the process died first) come back from the change log, without a write.
func TestRestartReplaysLog(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	ctx := t.Context()
	first, err := New(Config{Host: testHost, DataDir: dir, SeedXML: seedXML, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	nc := bustest.Connect(t, ns)
	if _, err := first.Serve(ctx, nc); err != nil {
		t.Fatal(err)
	}
	if _, err := first.Apply(ctx, setFeature("domain-5", "saved", "yes")); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if _, err := first.Apply(ctx, setMemory("domain-5", fmt.Sprint(1000+i), false)); err != nil {
			t.Fatal(err)
		}
	}
	want := first.Snapshot()
	nc.Close() // dies without Close: qubes.xml stays at the first change

	second := serve(t, ns, Config{DataDir: dir})
	got := second.Snapshot()
	if got.Revision != want.Revision || property(got.Config, "domain-5", "memory") != "1049" {
		t.Fatalf("after restart: revision %d memory %q; want %d 1049", got.Revision, property(got.Config, "domain-5", "memory"), want.Revision)
	}
	if second.Writes() != 0 {
		t.Fatalf("replay of changes without ChangesConfig wrote qubes.xml %d times", second.Writes())
	}
	if err := second.Close(ctx); err != nil {
		t.Fatal(err)
	}
	onDisk, err := qubesxml.Load(filepath.Join(dir, "qubes.xml"))
	if err != nil || property(onDisk, "domain-5", "memory") != "1049" {
		t.Fatalf("qubes.xml after Close: %v", err)
	}
}

// TestRestartAfterCompaction: the record qubes.xml's marker names was purged by a
// compaction; the restart rebuilds from the log's base and rewrites qubes.xml.
func TestRestartAfterCompaction(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	ctx := t.Context()
	first, err := New(Config{Host: testHost, DataDir: dir, SeedXML: seedXML, CompactEvery: 5, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	nc := bustest.Connect(t, ns)
	if _, err := first.Serve(ctx, nc); err != nil {
		t.Fatal(err)
	}
	if _, err := first.Apply(ctx, setMemory("domain-7", "1", true)); err != nil {
		t.Fatal(err)
	}
	// Written in the background; the changes below ask for no write.
	if err := first.WaitWritten(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := first.Apply(ctx, setMemory("domain-7", fmt.Sprint(100+i), false)); err != nil {
			t.Fatal(err)
		}
	}
	want := first.Revision()
	nc.Close()
	_, mark, err := loadCheckpoint(dir)
	if err != nil || mark.Revision != 2 {
		t.Fatalf("qubes.xml before the restart: %+v %v", mark, err)
	}

	second := serve(t, ns, Config{DataDir: dir, CompactEvery: 5})
	if got := second.Snapshot(); got.Revision != want || property(got.Config, "domain-7", "memory") != "119" {
		t.Fatalf("after restart at %d, want %d", got.Revision, want)
	}
	_, mark, err = loadCheckpoint(dir)
	if err != nil || mark.Revision != want || second.Writes() != 1 {
		t.Fatalf("qubes.xml after the rebuild: %+v %v, %d writes", mark, err, second.Writes())
	}
}

// TestStandbyFromEmptyDir: an instance with no qubes.xml builds its state from the
// change log (after a compaction: from the base) and writes its own qubes.xml.
func TestStandbyFromEmptyDir(t *testing.T) {
	ns := bustest.RunJetStream(t)
	ctx := t.Context()
	a := serve(t, ns, Config{DataDir: t.TempDir(), SeedXML: seedXML, CompactEvery: 10})
	for i := range 25 {
		if _, err := a.Apply(ctx, setMemory("domain-4", fmt.Sprint(i), i%5 == 0)); err != nil {
			t.Fatal(err)
		}
	}
	bDir := t.TempDir()
	b := serve(t, ns, Config{DataDir: bDir, CompactEvery: 10})
	if got, want := b.Snapshot(), a.Snapshot(); got.Revision != want.Revision || property(got.Config, "domain-4", "memory") != "24" {
		t.Fatalf("standby at %d, active at %d", got.Revision, want.Revision)
	}
	onDisk, err := qubesxml.Load(filepath.Join(bDir, "qubes.xml"))
	if err != nil || property(onDisk, "domain-4", "memory") != "24" {
		t.Fatalf("standby's qubes.xml: %v", err)
	}
	// The log holds the latest base and what followed it, not all 26 records.
	js, _ := jetstream.New(bustest.Connect(t, ns))
	st, err := js.Stream(ctx, changelog.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(testHost.Config()))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.Subjects[testHost.Config()]; n > 11 {
		t.Fatalf("%d records for the host after compaction", n)
	}
	// The standby follows the active instance's changes.
	rev, err := a.Apply(ctx, setMemory("domain-4", "777", false))
	if err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if b.Revision() != rev {
			return fmt.Errorf("standby at %d, want %d", b.Revision(), rev)
		}
		return nil
	})
}

// TestInstancesStaySerial: two instances take conflicting mutations at once (clients
// reach either through the queue group). Exactly one of the conflicting creations
// wins, and every revision holds the invariants on both instances and a replica.
func TestInstancesStaySerial(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir() // shared: the instances also take turns on the qubes.xml lock
	a := serve(t, ns, Config{DataDir: dir, SeedXML: seedXML})
	b := serve(t, ns, Config{DataDir: dir})
	ctx := t.Context()
	rep, err := replica.Follow(ctx, bustest.Connect(t, ns), testHost, quiet)
	if err != nil {
		t.Fatal(err)
	}
	newDomain := func(id, name, qid, netvm string) config.Mutation {
		return config.Mutation{ChangesConfig: true, Ops: []config.Op{{Kind: config.OpAddDomain, New: &config.Domain{
			ID: id, Class: "AppVM", Properties: []config.Property{
				{Name: "label", Value: "red"}, {Name: "name", Value: name}, {Name: "qid", Value: qid}, {Name: "netvm", Value: netvm}},
		}}}}
	}
	var sameName, sameQid, refs atomic.Int64
	var wg sync.WaitGroup
	for c := range 20 {
		client := configstore.Client{NC: bustest.Connect(t, ns), Host: testHost, Caller: configstore.Operator}
		wg.Go(func() {
			if _, err := client.Apply(ctx, newDomain(fmt.Sprintf("domain-n%d", c), "dup", fmt.Sprint(100+c), "")); err == nil {
				sameName.Add(1)
			} else if !errors.Is(err, config.ErrDuplicate) {
				t.Error(err)
			}
			if _, err := client.Apply(ctx, newDomain(fmt.Sprintf("domain-q%d", c), fmt.Sprintf("q%d", c), "500", "")); err == nil {
				sameQid.Add(1)
			} else if !errors.Is(err, config.ErrDuplicate) {
				t.Error(err)
			}
			// Half point their netvm at sys-net while the other half try to remove it.
			var m config.Mutation
			if c%2 == 0 {
				m = config.Mutation{Ops: []config.Op{{Kind: config.OpSetProperty, Domain: domainIDs[c%len(domainIDs)], Name: "netvm", Value: "sys-net"}}}
			} else {
				m = config.Mutation{Ops: []config.Op{{Kind: config.OpDelDomain, Domain: "domain-3"}}}
			}
			if _, err := client.Apply(ctx, m); err == nil {
				refs.Add(1)
			} else if !errors.Is(err, configstore.ErrRejected) {
				t.Error(err)
			}
			// And a burst of plain changes, so that both instances append at once.
			for i := range 10 {
				if _, err := client.Apply(ctx, setMemory(domainIDs[(c+i)%len(domainIDs)], fmt.Sprint(i), false)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if sameName.Load() != 1 || sameQid.Load() != 1 {
		t.Fatalf("%d creations of name dup and %d of qid 500 succeeded; want 1 each", sameName.Load(), sameQid.Load())
	}
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if a.Revision() != b.Revision() || rep.Revision() != a.Revision() {
			return fmt.Errorf("revisions a %d b %d replica %d", a.Revision(), b.Revision(), rep.Revision())
		}
		return nil
	})
	for name, c := range map[string]*config.Config{"a": a.Snapshot().Config, "b": b.Snapshot().Config} {
		if err := c.CheckInvariants(); err != nil {
			t.Fatalf("instance %s: %v", name, err)
		}
	}
	rep.View(func(c *config.Config) {
		if err := c.CheckInvariants(); err != nil {
			t.Fatalf("replica: %v", err)
		}
	})
	ma, mb := a.Metrics(), b.Metrics()
	t.Logf("instance a: %d appends, %d conflicts; b: %d appends, %d conflicts; writes %d + %d",
		ma.Appends, ma.Conflicts, mb.Appends, mb.Conflicts, ma.Writes, mb.Writes)
	if ma.Appends+mb.Appends != a.Revision()-1 {
		t.Fatalf("appends %d + %d, revision %d", ma.Appends, mb.Appends, a.Revision())
	}
	if _, _, err := loadCheckpoint(dir); err != nil {
		t.Fatal(err)
	}
}

// TestFollowAcrossServerRestart: a replica keeps following when its NATS server
// restarts; nothing acknowledged before or after is missed.
func TestFollowAcrossServerRestart(t *testing.T) {
	storeDir := t.TempDir()
	ns := startServer(t, storeDir, -1)
	url := ns.ClientURL()
	dir := t.TempDir()
	store := serve(t, ns, Config{DataDir: dir, SeedXML: seedXML})
	ctx := t.Context()
	rep, err := replica.Follow(ctx, bustest.Connect(t, ns), testHost, quiet)
	if err != nil {
		t.Fatal(err)
	}
	client := configstore.Client{NC: bustest.Connect(t, ns), Host: testHost, Caller: configstore.Operator}
	for i := range 10 {
		if _, err := client.Apply(ctx, setMemory("domain-6", fmt.Sprint(i), false)); err != nil {
			t.Fatal(err)
		}
	}
	ns.Shutdown()
	ns.WaitForShutdown()
	startServer(t, storeDir, portOf(t, url))
	var rev uint64
	for i := 10; i < 20; i++ {
		bustest.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
			r, err := client.Apply(ctx, setMemory("domain-6", fmt.Sprint(i), false))
			rev = r
			return err
		})
	}
	if err := rep.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
	var got string
	rep.View(func(c *config.Config) { got = property(c, "domain-6", "memory") })
	if got != "19" || rev != store.Revision() {
		t.Fatalf("replica memory %q at %d, store at %d", got, rev, store.Revision())
	}
}

// A client given the store in its process (configstore.Local) gets from ApplyLocal
// what it gets over NATS: the same revisions and the same errors, for changes,
// stale revisions and refused ops. Ops that carry a whole qube go over NATS; a store
// that stopped serving answers nothing, and the call goes over NATS, where another
// instance answers.
func TestApplyLocalAnswersAsOverNATS(t *testing.T) {
	ns := bustest.RunJetStream(t)
	store := serve(t, ns, Config{DataDir: t.TempDir(), SeedXML: seedXML})
	standby := serve(t, ns, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	nc := bustest.Connect(t, ns)
	remote := configstore.Client{NC: nc, Host: testHost, Caller: configstore.Operator}
	counting := &countingLocal{store: store}
	local := configstore.Client{NC: nc, Host: testHost, Caller: configstore.Operator, Local: counting}

	calls := []config.Mutation{
		setFeature("domain-3", "f", "1"),
		{ExpectRevision: 1},
		{Ops: []config.Op{{Kind: config.OpSetProperty, Domain: "domain-3", Name: "netvm", Value: "nosuch"}}},
		{Ops: []config.Op{{Kind: config.OpSetFeature, Domain: "domain-999", Name: "f", Value: "1"}}},
		setFeature("domain-4", "f", "2"),
	}
	for i, m := range calls {
		rev := store.Revision()
		m1 := m
		if m.ExpectRevision != 0 {
			m1.ExpectRevision = rev - 1
		}
		lrev, lerr := local.Apply(ctx, m1)
		if lrev != 0 {
			lrev -= rev // what it added, to compare with the second call's
		}
		rev = store.Revision()
		m2 := m
		if m.ExpectRevision != 0 {
			m2.ExpectRevision = rev - 1
		}
		rrev, rerr := remote.Apply(ctx, m2)
		if rrev != 0 {
			rrev -= rev
		}
		if lrev != rrev || fmt.Sprint(lerr) != fmt.Sprint(rerr) {
			t.Fatalf("call %d: locally %d, %v; over NATS %d, %v", i, lrev, lerr, rrev, rerr)
		}
		for _, target := range []error{configstore.ErrRejected, config.ErrStaleRevision, config.ErrDanglingRef, config.ErrNoSuchDomain} {
			if errors.Is(lerr, target) != errors.Is(rerr, target) {
				t.Fatalf("call %d: errors.Is(%v) differs: locally %v, over NATS %v", i, target, lerr, rerr)
			}
		}
	}
	if got := counting.answered.Load(); got != int64(len(calls)) {
		t.Fatalf("%d of %d calls answered in process", got, len(calls))
	}
	// An op the caller does not own is refused alike, and changes nothing.
	rev := store.Revision()
	remote.Caller, local.Caller = string(rpc.Storage), string(rpc.Storage)
	answered := counting.answered.Load() + 1 // the refusal is answered in process
	_, lerr := local.Apply(ctx, setFeature("domain-3", "f", "taken"))
	_, rerr := remote.Apply(ctx, setFeature("domain-3", "f", "taken"))
	if !errors.Is(lerr, configstore.ErrNotPermitted) || fmt.Sprint(lerr) != fmt.Sprint(rerr) {
		t.Fatalf("storage setting a feature: locally %v, over NATS %v", lerr, rerr)
	}
	if counting.answered.Load() != answered {
		t.Fatal("the refusal was not answered in process")
	}
	// Both counted: the one over NATS by whichever instance answered it.
	if here, there := store.Metrics().Refused, standby.Metrics().Refused; here+there != 2 {
		t.Fatalf("refusals counted: %d here, %d on the standby; want 2 in all", here, there)
	}
	if store.Revision() != rev {
		t.Fatalf("a refused change moved the store from revision %d to %d", rev, store.Revision())
	}
	remote.Caller, local.Caller = configstore.Operator, configstore.Operator
	// A new qube is copied over NATS, not shared.
	before := counting.asked.Load()
	if _, err := local.Apply(ctx, config.Mutation{Ops: []config.Op{{Kind: config.OpAddLabel, Label: &config.Label{Index: 99, Name: "x", Color: "0x000000"}}}}); err != nil {
		t.Fatal(err)
	}
	if counting.asked.Load() != before {
		t.Fatal("a mutation carrying a label was handed over in process")
	}
	// Stopped: the standby answers over NATS.
	if err := store.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rev, err := local.Apply(ctx, setFeature("domain-3", "f", "3"))
	if err != nil {
		t.Fatalf("after the local instance stopped: %v", err)
	}
	if counting.answered.Load() != answered {
		t.Fatal("a stopped instance answered")
	}
	if got := standby.Revision(); got != rev {
		t.Fatalf("the standby is at revision %d, the change made %d", got, rev)
	}
}

// countingLocal counts the calls a Local was asked and those it answered.
type countingLocal struct {
	store           *Store
	asked, answered atomic.Int64
}

func (c *countingLocal) ApplyLocal(ctx context.Context, caller string, m config.Mutation) (configstore.ApplyReply, bool) {
	c.asked.Add(1)
	rep, ok := c.store.ApplyLocal(ctx, caller, m)
	if ok {
		c.answered.Add(1)
	}
	return rep, ok
}
