package system

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/services/backup/archive"
)

// recordedBackupInfo is admin.backup.Info's response in transcript 90.
func recordedBackupInfo(t *testing.T) []byte {
	t.Helper()
	for _, ex := range loadTranscript(t, "90-qvm-backup-work-personal.jsonl") {
		if strings.HasPrefix(string(ex.Request), "admin.backup.Info+") {
			return ex.Response
		}
	}
	t.Fatal("no admin.backup.Info in transcript 90")
	return nil
}

// Through the socket, as qvm-backup: Info answers transcript 90's summary byte for
// byte; Execute writes an archive of a running qube whose file-pool image holds data
// (read through the storage service), which reads back with the passphrase; the
// qubes get backup_timestamp; Cancel of nothing answers as qubesd.
func TestBackupThroughSocket(t *testing.T) {
	var root string
	profiles, out := t.TempDir(), t.TempDir()
	sys := startSystem(t, storageRoot(t, &root), func(c *Config) {
		c.BackupProfiles = profiles
		c.BackupScrypt = archive.ScryptParams{LogN: 10, R: 8, P: 1}
	})
	profile := "compression: true\ndestination_path: " + out + "\ndestination_vm: dom0\ninclude:\n- work\n- personal\npassphrase_text: correct horse battery\n"
	if err := os.WriteFile(filepath.Join(profiles, "backup-run-8028.conf"), []byte(profile), 0o600); err != nil {
		t.Fatal(err)
	}
	info := "admin.backup.Info+backup-run-8028 dom0 name dom0\x00"
	if got, want := roundTrip(t, sys.Socket, []byte(info)), recordedBackupInfo(t); !bytes.Equal(got, want) {
		t.Fatalf("Info:\n got %q\nwant %q", got, want)
	}

	// work's private image with data, then work runs: the backup holds the image
	// as it was committed.
	img := filepath.Join(root, "var/lib/qubes/appvms/work/private.img")
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("private data of work\n"), 5000)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(8 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	wantReply(t, sys, "admin.vm.Start+ dom0 name work\x00", "0\x00")
	if got := string(roundTrip(t, sys.Socket, []byte(info))); !strings.Contains(got, "             work |           VM |") ||
		!strings.Contains(got, " <-- The VM is running, backup will contain its state from before its start!\n") {
		t.Errorf("Info while work runs:\n%s", got)
	}

	wantReply(t, sys, "admin.backup.Execute+backup-run-8028 dom0 name dom0\x00", "0\x00")
	ents, err := os.ReadDir(out)
	if err != nil || len(ents) != 1 {
		t.Fatalf("backup dir holds %v (%v)", ents, err)
	}
	raw, err := os.ReadFile(filepath.Join(out, ents[0].Name()))
	if err != nil {
		t.Fatal(err)
	}
	a, err := archive.Read(context.Background(), bytes.NewReader(raw), []byte("correct horse battery"), archive.ReadOptions{})
	if err != nil {
		t.Fatalf("read the archive back: %v", err)
	}
	if got := strings.Join(a.Outer, " "); got != "backup-header backup-header.hmac qubes.xml.000.enc vm5/private.img.000.enc vm6/private.img.000.enc" {
		t.Errorf("outer files: %s", got)
	}
	priv, _ := a.File("vm5/private.img")
	if !priv.Sparse || priv.Size != 8<<20 || len(priv.Data) != 8<<20 || !bytes.Equal(priv.Data[3<<20:3<<20+len(data)], data) {
		t.Errorf("vm5/private.img: sparse %v size %d", priv.Sparse, priv.Size)
	}

	for _, qube := range []string{"work", "personal"} {
		got := string(roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+backup_timestamp dom0 name "+qube+"\x00")))
		if !strings.HasPrefix(got, "0\x00default=False type=int 1") {
			t.Errorf("%s backup_timestamp: %q", qube, got)
		}
	}
	wantReply(t, sys, "admin.backup.Cancel+backup-run-8028 dom0 name dom0\x00", "2\x00QubesException\x00\x00Backup operation not running\x00")
}
