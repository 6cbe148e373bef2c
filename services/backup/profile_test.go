package backup

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

func seed(t *testing.T) *config.Config {
	t.Helper()
	cfg, err := qubesxml.Load(filepath.Join("..", "..", "testdata", "qubes.xml"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// recordedInfo is admin.backup.Info's answer in transcript 90 (qvm-backup of work and
// personal on the real qubesd).
func recordedInfo(t *testing.T) string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "testdata", "transcripts", "90-qvm-backup-work-personal.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec struct {
			Req  struct{ Method string }
			Resp struct{ Body string }
		}
		json.Unmarshal(sc.Bytes(), &rec)
		if rec.Req.Method == "admin.backup.Info" {
			return rec.Resp.Body
		}
	}
	t.Fatal("no admin.backup.Info in the transcript")
	return ""
}

func writeProfile(t *testing.T, dir, id, text string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, id+".conf"), []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// The profile qvm-backup writes, and the summary qubesd answered for it.
func TestInfoSummaryAsRecorded(t *testing.T) {
	dir := t.TempDir()
	writeProfile(t, dir, "backup-run-8028", "compression: true\ndestination_path: /var/backups/qubes-test\ndestination_vm: dom0\ninclude:\n- work\n- personal\npassphrase_text: correct horse battery\n")
	p, err := LoadProfile(dir, "backup-run-8028")
	if err != nil {
		t.Fatal(err)
	}
	cfg := seed(t)
	if _, err := p.CheckDestination(cfg); err != nil {
		t.Fatal(err)
	}
	sel, others := p.Select(cfg)
	got := Summary(Plan(sel, func(*config.Domain, Volume) int64 { return 0 }), others, nil)
	if want := recordedInfo(t); got != want {
		t.Fatalf("summary:\n%s\nwant:\n%s", got, want)
	}
	// A running qube is marked.
	got = Summary(Plan(sel, func(*config.Domain, Volume) int64 { return 2048 }), others, func(n string) bool { return n == "work" })
	if !strings.Contains(got, "             work |           VM |      2.0 KiB | <-- The VM is running, backup will contain its state from before its start!\n") ||
		!strings.Contains(got, "      Total size: |                     4.0 KiB |\n") {
		t.Fatalf("running summary:\n%s", got)
	}
}

func TestProfileErrors(t *testing.T) {
	dir := t.TempDir()
	cfg := seed(t)
	full := "destination_vm: dom0\ndestination_path: /tmp\ninclude: [work]\npassphrase_text: x\n"
	for _, tc := range []struct {
		name, id, text, want string
		is                   error
		stage                string // load, dest or passphrase
	}{
		{name: "slash", id: "a/b", want: "Backup profile ID must not contain forward slash character", is: ErrProfileID, stage: "load"},
		{name: "missing", id: "nope", want: "Backup profile does not exist: nope", is: ErrProfileNotFound, stage: "load"},
		// os.path.exists is false for a name the filesystem refuses as too long.
		{name: "too long", id: strings.Repeat("p", 60<<10), want: "Backup profile does not exist: " + strings.Repeat("p", 60<<10), is: ErrProfileNotFound, stage: "load"},
		{name: "no destination_vm", id: "p1", text: "destination_path: /tmp\ninclude: [work]\n", want: "Invalid backup profile - missing 'destination_vm'", is: ErrProfileInvalid, stage: "load"},
		{name: "no destination_path", id: "p2", text: "destination_vm: dom0\ninclude: [work]\n", want: "Invalid backup profile - missing 'destination_path'", is: ErrProfileInvalid, stage: "load"},
		{name: "no include", id: "p3", text: "destination_vm: dom0\ndestination_path: /tmp\n", want: "Invalid backup profile - missing 'include'", is: ErrProfileInvalid, stage: "load"},
		{name: "unknown destination", id: "p4", text: strings.Replace(full, "dom0", "nosuch", 1), want: "Invalid destination_vm specified in backup profile", is: ErrProfileInvalid, stage: "dest"},
		{name: "no passphrase", id: "p5", text: strings.Replace(full, "passphrase_text: x\n", "", 1), want: "Invalid backup profile - you need to specify passphrase_text or passphrase_vm", is: ErrProfileInvalid, stage: "passphrase"},
		{name: "bad passphrase_vm", id: "p6", text: strings.Replace(full, "passphrase_text: x", "passphrase_vm: nosuch", 1), want: "Invalid backup profile - invalid passphrase_vm", is: ErrProfileInvalid, stage: "passphrase"},
		{name: "passphrase_vm without qrexec", id: "p7", text: strings.Replace(full, "passphrase_text: x", "passphrase_vm: work", 1), want: "Failed to retrieve passphrase from 'work' VM", is: ErrProfileInvalid, stage: "passphrase"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.text != "" {
				writeProfile(t, dir, tc.id, tc.text)
			}
			p, err := LoadProfile(dir, tc.id)
			if err == nil && tc.stage != "load" {
				if tc.stage == "dest" {
					_, err = p.CheckDestination(cfg)
				} else {
					_, err = p.Passphrase(cfg)
				}
			}
			if err == nil || err.Error() != tc.want || !errors.Is(err, tc.is) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func TestSelectSpecialNames(t *testing.T) {
	cfg := seed(t)
	p := &Profile{Include: []string{"@type:TemplateVM", "@tag:backup"}, Exclude: []string{"personal"}}
	sel, _ := p.Select(cfg)
	var names []string
	for _, d := range sel {
		names = append(names, d.Name())
	}
	if got := strings.Join(names, " "); got != "fedora-41 work" {
		t.Fatalf("selected %q", got)
	}
	if (&Profile{}).Compressed {
		t.Fatal("zero profile compressed")
	}
}

func TestSizeToHuman(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 1023: "1023", 1024: "1.0 KiB", 1536: "1.5 KiB", 10 * 1024 * 1024: "10.0 MiB", 2 << 30: "2.0 GiB", 1288490189: "1.2 GiB"} {
		if got := SizeToHuman(n); got != want {
			t.Errorf("%d: %q, want %q", n, got, want)
		}
	}
}
