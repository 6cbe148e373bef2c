package backup

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/internal/testhost"
	"github.com/qubesbus/qubesbus/schemas/config"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/backup/archive"
)

var testScrypt = archive.ScryptParams{LogN: 10, R: 8, P: 1}

const passphrase = "correct horse battery"

// fakePower: the qubes set here run (the lifecycle service has its own tests).
type fakePower struct {
	mu      sync.Mutex
	running map[string]bool
}

func (f *fakePower) PowerStates(context.Context) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]string{"dom0": "Running"}
	for n := range f.running {
		out[n] = "Running"
	}
	return out, nil
}

// fakeVolumes holds volume data in memory; the storage service's export is tested in
// its module and end to end in cmd/qubesbus. Reads of a qube in block wait until
// the read's context ends, after a signal on reading.
type fakeVolumes struct {
	data    map[string][]byte // "qube:volume" → content; others are empty 2 GiB images
	block   string
	reading chan struct{}
	once    sync.Once
}

func (f *fakeVolumes) ExportVolume(_ context.Context, qube, volume string) (storageapi.ExportReply, error) {
	d, ok := f.data[qube+":"+volume]
	if !ok {
		return storageapi.ExportReply{Size: 2 << 30}, nil
	}
	// one data region at 64 KiB, the rest holes
	return storageapi.ExportReply{Size: 1 << 20, Usage: int64(len(d)), Extents: []storageapi.Extent{{Offset: 64 << 10, Length: int64(len(d))}}}, nil
}

func (f *fakeVolumes) ReadVolume(ctx context.Context, qube, volume string, p []byte, off int64) (int, error) {
	if qube == f.block {
		f.once.Do(func() { close(f.reading) })
		<-ctx.Done()
		return 0, ctx.Err()
	}
	d := f.data[qube+":"+volume]
	p = p[:min(len(p), storageapi.MaxRead)]
	if off < 64<<10 || off-64<<10 > int64(len(d)) {
		return 0, fmt.Errorf("read outside the data region at %d", off)
	}
	return copy(p, d[off-64<<10:]), nil
}

type harness struct {
	*testhost.Host
	profiles, out string
	power         *fakePower
	vols          *fakeVolumes
	stop          context.CancelFunc // ends the context the service was served with
	after         uint64             // configuration revision the calls of wire wait for
}

// wire is testhost's Wire from dom0 to dom0, by a caller that has seen revision
// h.after (the service's replica reaches it before it answers, as behind the gateway).
func (h *harness) wire(method, arg string) string {
	h.T.Helper()
	req := &envelope.Request{Method: method, Source: "dom0", Dest: "dom0", Arg: arg, ID: h.T.Name() + "-" + method,
		After: envelope.Marks{ConfigRev: h.after}}
	msg, err := h.NC.RequestMsgWithContext(h.Ctx, req.Msg(h.Subjects.API(method)))
	if err != nil {
		h.T.Fatal(err)
	}
	rep, err := envelope.ParseReply(msg)
	if err != nil {
		h.T.Fatal(err)
	}
	switch rep.Status {
	case envelope.StatusOK:
		return "0:" + string(rep.Content)
	case envelope.StatusException:
		return "2:" + rep.Exception.Class + ":" + rep.Exception.Message
	}
	return "abort"
}

func start(t *testing.T, cfg Config, vols *fakeVolumes) *harness {
	t.Helper()
	h := &harness{Host: testhost.Start(t, ""), profiles: t.TempDir(), out: t.TempDir(), power: &fakePower{}, vols: vols}
	if h.vols == nil {
		h.vols = &fakeVolumes{}
	}
	cfg.Host, cfg.ProfileDir, cfg.Scrypt, cfg.Lifecycle, cfg.Volumes = h.Subjects, h.profiles, testScrypt, h.power, h.vols
	cfg.TempDir = t.TempDir()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(h.Ctx)
	h.stop = stop
	svc, err := s.Serve(ctx, h.Connect())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	return h
}

func (h *harness) profile(t *testing.T, id, text string) {
	t.Helper()
	writeProfile(t, h.profiles, id, text)
}

// The summary of transcript 90's profile, its errors with qubesd's classes and texts,
// and backup-get-files on each qube in it.
func TestInfo(t *testing.T) {
	h := start(t, Config{}, nil)
	h.profile(t, "backup-run-8028", "compression: true\ndestination_path: /var/backups/qubes-test\ndestination_vm: dom0\ninclude:\n- work\n- personal\npassphrase_text: correct horse battery\n")
	var seq uint64
	h.EventsAfter(&seq)
	if got, want := h.Wire("admin.backup.Info", "dom0", "backup-run-8028", ""), "0:"+recordedInfo(t); got != want {
		t.Fatalf("Info:\n%s\nwant\n%s", got, want)
	}
	if got := strings.Join(h.EventsAfter(&seq), " "); got != "work|backup-get-files| personal|backup-get-files|" {
		t.Errorf("events %s", got)
	}
	full := "destination_vm: dom0\ndestination_path: /tmp\ninclude: [work]\npassphrase_text: x\n"
	for _, tc := range []struct{ name, id, text, want string }{
		{"slash", "a/b", "", "2:ProtocolError:Backup profile ID must not contain forward slash character"},
		{"missing", "nope", "", "2:QubesBackupProfileNotFoundError:Backup profile does not exist: nope"},
		{"no destination_vm", "p1", "destination_path: /tmp\ninclude: [work]\n", "2:QubesException:Invalid backup profile - missing 'destination_vm'"},
		{"no destination_path", "p2", "destination_vm: dom0\ninclude: [work]\n", "2:QubesException:Invalid backup profile - missing 'destination_path'"},
		{"no include", "p3", "destination_vm: dom0\ndestination_path: /tmp\n", "2:QubesException:Invalid backup profile - missing 'include'"},
		{"unknown destination", "p4", strings.Replace(full, "dom0", "nosuch", 1), "2:QubesException:Invalid destination_vm specified in backup profile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.text != "" {
				h.profile(t, tc.id, tc.text)
			}
			for _, m := range []string{"admin.backup.Info", "admin.backup.Execute"} {
				if got := h.Wire(m, "dom0", tc.id, ""); got != tc.want {
					t.Errorf("%s: %s, want %s", m, got, tc.want)
				}
			}
		})
	}
	// The passphrase is Execute's alone: Info answers without one.
	h.profile(t, "nopass", strings.Replace(full, "passphrase_text: x\n", "", 1))
	if got := h.Wire("admin.backup.Info", "dom0", "nopass", ""); !strings.HasPrefix(got, "0:") {
		t.Errorf("Info without a passphrase: %s", got)
	}
	if got, want := h.Wire("admin.backup.Execute", "dom0", "nopass", ""), "2:QubesException:Invalid backup profile - you need to specify passphrase_text or passphrase_vm"; got != want {
		t.Errorf("Execute without a passphrase: %s", got)
	}
	if got, want := h.Wire("admin.backup.Cancel", "dom0", "nope", ""), "2:QubesException:Backup operation not running"; got != want {
		t.Errorf("Cancel: %s", got)
	}
	if got, want := h.Wire("admin.backup.Cancel", "dom0", "a/b", ""), "2:ProtocolError:Backup profile ID must not contain forward slash character"; got != want {
		t.Errorf("Cancel: %s", got)
	}
}

func readArchive(t *testing.T, path string) *archive.Archive {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	a, err := archive.Read(context.Background(), bytes.NewReader(data), []byte(passphrase), archive.ReadOptions{})
	if err != nil {
		t.Fatalf("read back %s: %v", path, err)
	}
	return a
}

// onlyFile is the one file in dir.
func onlyFile(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 {
		t.Fatalf("%s holds %d files, want 1", dir, len(ents))
	}
	return filepath.Join(dir, ents[0].Name())
}

// Execute writes an archive that reads back (header, every HMAC, qubes.xml, volume
// data), sends backup-progress, and records backup_timestamp through persistence,
// with qubesd's events, running qubes included.
func TestExecute(t *testing.T) {
	data := bytes.Repeat([]byte("work's data "), 20000)
	h := start(t, Config{ProgressInterval: 1}, &fakeVolumes{data: map[string][]byte{"work:private": data}})
	h.power.running = map[string]bool{"work": true}
	h.profile(t, "p", fmt.Sprintf("destination_vm: dom0\ndestination_path: %s\ninclude: [work, personal]\npassphrase_text: %s\n", h.out, passphrase))
	var seq uint64
	h.EventsAfter(&seq)
	if got := h.Wire("admin.backup.Execute", "dom0", "p", ""); got != "0:" {
		t.Fatalf("Execute: %s", got)
	}
	path := onlyFile(t, h.out)
	if !strings.HasPrefix(filepath.Base(path), "qubes-") {
		t.Errorf("archive name %s", path)
	}
	a := readArchive(t, path)
	if a.Header.Version != 4 || !a.Header.Encrypted || !a.Header.Compressed || a.Header.CompressionFilter != "gzip" || a.Header.HMACAlgorithm != "scrypt" {
		t.Errorf("header %+v", a.Header)
	}
	if got := strings.Join(a.Outer, " "); got != "backup-header backup-header.hmac qubes.xml.000.enc vm5/private.img.000.enc vm6/private.img.000.enc" {
		t.Errorf("outer files: %s", got)
	}
	x, _ := a.File(archive.QubesXMLName)
	for _, s := range []string{`<feature name="backup-content">1</feature>`, `<feature name="backup-path">vm5/</feature>`,
		`<feature name="backup-path">vm6/</feature>`, fmt.Sprintf(`<feature name="backup-size">%d</feature>`, len(data)),
		`<feature name="backup-content"></feature>`} {
		if !bytes.Contains(x.Data, []byte(s)) {
			t.Errorf("qubes.xml lacks %s", s)
		}
	}
	f, _ := a.File("vm5/private.img")
	want := make([]byte, 1<<20)
	copy(want[64<<10:], data)
	if !f.Sparse || f.Size != 1<<20 || !bytes.Equal(f.Data, want) {
		t.Errorf("vm5/private.img: sparse %v size %d, data as written %v", f.Sparse, f.Size, bytes.Equal(f.Data, want))
	}
	if f, _ := a.File("vm6/private.img"); f.Size != 2<<30 || !f.Sparse {
		t.Errorf("vm6/private.img: %+v", f)
	}

	evs := h.EventsAfter(&seq)
	var progress, rest []string
	for _, e := range evs {
		if strings.HasPrefix(e, "|backup-progress|backup_profile=p,progress=") {
			progress = append(progress, e)
		} else {
			rest = append(rest, e)
		}
	}
	if len(progress) == 0 || !slices.Contains(progress, "|backup-progress|backup_profile=p,progress=100.0") {
		t.Errorf("progress events %v", progress)
	}
	for i, e := range rest {
		rest[i] = strings.Join(strings.Fields(strings.NewReplacer(",newvalue=", " ", ",oldvalue=", " ").Replace(e))[:1], "")
	}
	wantEvs := []string{"work|backup-get-files|", "personal|backup-get-files|",
		"work|property-pre-set:backup_timestamp|name=backup_timestamp", "work|property-set:backup_timestamp|name=backup_timestamp",
		"personal|property-pre-set:backup_timestamp|name=backup_timestamp", "personal|property-set:backup_timestamp|name=backup_timestamp"}
	if !slices.Equal(rest, wantEvs) {
		t.Errorf("events\n%v\nwant\n%v", rest, wantEvs)
	}
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range snap.Config.Domains {
		v, ok := d.Property("backup_timestamp")
		if in := d.Name() == "work" || d.Name() == "personal"; in != ok || (ok && v == "") {
			t.Errorf("%s: backup_timestamp %q %v", d.Name(), v, ok)
		}
	}
}

// Cancel stops a running backup at once and leaves no archive; while it runs a
// second Execute is refused.
func TestCancel(t *testing.T) {
	vols := &fakeVolumes{block: "work", reading: make(chan struct{}), data: map[string][]byte{"work:private": []byte("x")}}
	h := start(t, Config{}, vols)
	text := fmt.Sprintf("destination_vm: dom0\ndestination_path: %s/out\ninclude: [work]\npassphrase_text: %s\n", h.out, passphrase)
	h.profile(t, "p", text)
	h.profile(t, "other", text)
	done := make(chan envelope.Reply, 1)
	go func() { done <- h.Call("", "admin.backup.Execute", "dom0", "p", nil) }()
	<-vols.reading
	if _, err := os.Stat(filepath.Join(h.out, "out")); err != nil {
		t.Fatalf("no partial archive while it runs: %v", err)
	}
	for _, id := range []string{"p", "other"} {
		if got, want := h.Wire("admin.backup.Execute", "dom0", id, ""), "2:BackupAlreadyRunningError:Backup already running"; got != want {
			t.Errorf("second Execute of %s: %s", id, got)
		}
	}
	if got, want := h.Wire("admin.backup.Cancel", "dom0", "other", ""), "2:QubesException:Backup operation not running"; got != want {
		t.Errorf("Cancel of another profile: %s", got)
	}
	if got := h.Wire("admin.backup.Cancel", "dom0", "p", ""); got != "0:" {
		t.Fatalf("Cancel: %s", got)
	}
	rep := <-done
	if rep.Status != envelope.StatusException || rep.Exception.Class != "BackupCancelledError" || rep.Exception.Message != "Backup cancelled" {
		t.Fatalf("Execute after Cancel: %s %+v", rep.Status, rep.Exception)
	}
	if ents, _ := os.ReadDir(h.out); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
	if got, want := h.Wire("admin.backup.Cancel", "dom0", "p", ""), "2:QubesException:Backup operation not running"; got != want {
		t.Errorf("Cancel after the end: %s", got)
	}
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range snap.Config.Domains {
		if _, ok := d.Property("backup_timestamp"); ok {
			t.Errorf("%s has a backup_timestamp after a cancelled backup", d.Name())
		}
	}
}

// A service that stops cancels its running backup, which leaves no archive.
func TestStopCancels(t *testing.T) {
	vols := &fakeVolumes{block: "work", reading: make(chan struct{}), data: map[string][]byte{"work:private": []byte("x")}}
	h := start(t, Config{}, vols)
	h.profile(t, "p", fmt.Sprintf("destination_vm: dom0\ndestination_path: %s/out\ninclude: [work]\npassphrase_text: %s\n", h.out, passphrase))
	done := make(chan envelope.Reply, 1)
	go func() { done <- h.Call("", "admin.backup.Execute", "dom0", "p", nil) }()
	<-vols.reading
	h.stop()
	rep := <-done
	if rep.Status != envelope.StatusException || rep.Exception.Class != "BackupCancelledError" {
		t.Fatalf("Execute when the service stopped: %s %+v", rep.Status, rep.Exception)
	}
	if ents, _ := os.ReadDir(h.out); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}

// Destinations: a missing directory as qubesd; a qube's sink directory; a qube
// without one fails as a failing qubes.Backup call.
func TestDestinations(t *testing.T) {
	sinks := t.TempDir()
	h := start(t, Config{SinkDir: sinks}, nil)
	h.profile(t, "nodir", fmt.Sprintf("destination_vm: dom0\ndestination_path: %s/no/such\ninclude: [personal]\npassphrase_text: %s\n", h.out, passphrase))
	if got, want := h.Wire("admin.backup.Execute", "dom0", "nodir", ""), "2:QubesException:ERROR: the backup directory for "+h.out+"/no/such does not exists"; got != want {
		t.Errorf("missing directory: %s", got)
	}
	h.profile(t, "file", fmt.Sprintf("destination_vm: dom0\ndestination_path: %s/named\ninclude: [personal]\npassphrase_text: %s\ncompression: false\n", h.out, passphrase))
	if got := h.Wire("admin.backup.Execute", "dom0", "file", ""); got != "0:" {
		t.Fatalf("to a file: %s", got)
	}
	if a := readArchive(t, filepath.Join(h.out, "named")); a.Header.Compressed {
		t.Errorf("compression: false wrote %+v", a.Header)
	}
	h.profile(t, "vm", fmt.Sprintf("destination_vm: untrusted\ndestination_path: /home/user/backups\ninclude: [personal]\npassphrase_text: %s\n", passphrase))
	if got, want := h.Wire("admin.backup.Execute", "dom0", "vm", ""), "2:QubesException:Writing backup to VM untrusted failed"; got != want {
		t.Errorf("to a qube without the directory: %s", got)
	}
	dir := filepath.Join(sinks, "untrusted", "home", "user", "backups")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := h.Wire("admin.backup.Execute", "dom0", "vm", ""); got != "0:" {
		t.Fatalf("to a qube: %s", got)
	}
	a := readArchive(t, onlyFile(t, dir))
	if _, ok := a.File("vm6/private.img"); !ok {
		t.Errorf("archive in the sink lacks vm6/private.img: %v", a.Outer)
	}
}

func TestPyFloat(t *testing.T) {
	for f, want := range map[float64]string{0: "0.0", 100: "100.0", 12.5: "12.5", 100.0 / 3: "33.333333333333336", 5e-05: "5e-05"} {
		if got := pyFloat(f); got != want {
			t.Errorf("%v: %s, want %s", f, got, want)
		}
	}
}

// A running qube whose private volume has snapshots disabled: Info warns, Execute
// refuses it as qubesd (QubesVMNotHaltedError) and writes nothing.
func TestRunningWithoutSnapshots(t *testing.T) {
	h := start(t, Config{}, nil)
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range snap.Config.Domains {
		if d.Name() != "work" {
			continue
		}
		vc := strings.Replace(string(d.VolumeConfig), `vid="appvms/work/private" revisions_to_keep="1"`, `vid="appvms/work/private" revisions_to_keep="-1"`, 1)
		if vc == string(d.VolumeConfig) {
			t.Fatal("work's private volume not found in its volume-config")
		}
		rev, err := h.Config().Apply(h.Ctx, config.Mutation{ExpectRevision: snap.Revision, Ops: []config.Op{{Kind: config.OpSetVolumeConfig, Domain: d.ID, Value: vc}}})
		if err != nil {
			t.Fatal(err)
		}
		h.after = rev
	}
	h.power.running = map[string]bool{"work": true}
	h.profile(t, "p", fmt.Sprintf("destination_vm: dom0\ndestination_path: %s\ninclude: [work]\npassphrase_text: %s\n", h.out, passphrase))
	if got := h.wire("admin.backup.Info", "p"); !strings.Contains(got, "             work |           VM |            0 | <-- The VM is running and private volume snapshots are disabled. Backup will fail!\n") {
		t.Errorf("Info:\n%s", got)
	}
	if got, want := h.wire("admin.backup.Execute", "p"), "2:QubesVMNotHaltedError:Domain is not powered off: 'work'"; got != want {
		t.Errorf("Execute: %s", got)
	}
	if ents, _ := os.ReadDir(h.out); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}
