// Package backup serves admin.backup.Info, Execute and Cancel: Qubes OS backups in
// format version 4 (package archive) of the qubes a profile selects.
//
// This file: backup profiles (<profiles dir>/<id>.conf, YAML, as dom0's
// /etc/qubes/backup) and the selection of qubes and files they make, with qubesd's
// texts (qubes/api/admin.py _load_backup_profile, qubes/backup.py Backup).
package backup

import (
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Errors of a profile, with qubesd's texts; each is a QubesException unless noted.
var (
	// ErrProfileNotFound is QubesBackupProfileNotFoundError.
	ErrProfileNotFound = errors.New("Backup profile does not exist")
	ErrProfileInvalid  = errors.New("invalid backup profile")
	// ErrProfileID is qubesd's enforce(): a ProtocolError.
	ErrProfileID = errors.New("Backup profile ID must not contain forward slash character")
)

// Profile is a parsed backup profile.
type Profile struct {
	ID              string
	Include         []string // nil: the qubes whose include_in_backups is true
	Exclude         []string
	DestinationVM   string
	DestinationPath string
	Compressed      bool
	Filter          string // the compression filter when compression is a string
	PassphraseText  *string
	PassphraseVM    *string
}

// ProfileError is a QubesException with qubesd's message.
type ProfileError struct {
	Msg string
	Err error // ErrProfileNotFound or ErrProfileInvalid
}

func (e *ProfileError) Error() string { return e.Msg }
func (e *ProfileError) Unwrap() error { return e.Err }

// LoadProfile reads <dir>/<id>.conf as qubesd: a missing file, then the required keys
// (destination_vm, destination_path, include) in its order; "$" in names is the old
// spelling of "@".
//
// A profile "does not exist" as qubesd's os.path.exists says: whenever the path cannot
// be stat'ed, whatever the reason (no such file, but also a name longer than the
// filesystem takes, ENAMETOOLONG, which a client chooses with a long profile id). A
// profile that exists but cannot be read is another error (qubesd's open raises, and
// the call is aborted).
func LoadProfile(dir, id string) (*Profile, error) {
	if err := CheckID(id); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, id+".conf")
	if _, err := os.Stat(path); err != nil {
		return nil, &ProfileError{Msg: "Backup profile does not exist: " + id, Err: ErrProfileNotFound}
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) { // removed meanwhile
		return nil, &ProfileError{Msg: "Backup profile does not exist: " + id, Err: ErrProfileNotFound}
	}
	if err != nil {
		return nil, fmt.Errorf("backup profile %s: %w", id, err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, &ProfileError{Msg: "Invalid backup profile - " + err.Error(), Err: ErrProfileInvalid}
	}
	missing := func(key string) error {
		return &ProfileError{Msg: fmt.Sprintf("Invalid backup profile - missing '%s'", key), Err: ErrProfileInvalid}
	}
	p := &Profile{ID: id, Compressed: true}
	for _, key := range []string{"destination_vm", "destination_path", "include"} {
		if _, ok := doc[key]; !ok {
			return nil, missing(key)
		}
	}
	p.DestinationVM = scalar(doc["destination_vm"])
	p.DestinationPath = scalar(doc["destination_path"])
	if inc := doc["include"]; inc != nil {
		p.Include = []string{}
		for _, n := range list(inc) {
			p.Include = append(p.Include, strings.ReplaceAll(n, "$", "@"))
		}
	}
	for _, n := range list(doc["exclude"]) {
		p.Exclude = append(p.Exclude, strings.ReplaceAll(n, "$", "@"))
	}
	switch c := doc["compression"].(type) {
	case nil:
		if _, set := doc["compression"]; set {
			p.Compressed = false
		}
	case bool:
		p.Compressed = c
	case string:
		p.Compressed, p.Filter = c != "", c
	default:
		p.Compressed = scalar(c) != "0"
	}
	if v, ok := doc["passphrase_text"]; ok {
		s := scalar(v)
		p.PassphraseText = &s
	}
	if v, ok := doc["passphrase_vm"]; ok {
		s := scalar(v)
		p.PassphraseVM = &s
	}
	return p, nil
}

// CheckID is qubesd's check of a profile id, before anything else: no "/".
func CheckID(id string) error {
	if strings.Contains(id, "/") {
		return ErrProfileID
	}
	return nil
}

func scalar(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	default:
		return fmt.Sprint(x)
	}
}

func list(v any) []string {
	items, _ := v.([]any)
	out := make([]string, 0, len(items))
	for _, it := range items {
		out = append(out, scalar(it))
	}
	return out
}

// Passphrase returns the profile's passphrase for Execute, with qubesd's errors.
// passphrase_vm needs qrexec (qubes.BackupPassphrase), which qubesbus does not run:
// it fails as qubesd does when the service call fails.
func (p *Profile) Passphrase(cfg *config.Config) (string, error) {
	switch {
	case p.PassphraseText != nil:
		return *p.PassphraseText, nil
	case p.PassphraseVM != nil:
		if findDomain(cfg, *p.PassphraseVM) == nil {
			return "", &ProfileError{Msg: "Invalid backup profile - invalid passphrase_vm", Err: ErrProfileInvalid}
		}
		return "", &ProfileError{Msg: fmt.Sprintf("Failed to retrieve passphrase from '%s' VM", *p.PassphraseVM), Err: ErrProfileInvalid}
	}
	return "", &ProfileError{Msg: "Invalid backup profile - you need to specify passphrase_text or passphrase_vm", Err: ErrProfileInvalid}
}

func findDomain(cfg *config.Config, name string) *config.Domain {
	for i := range cfg.Domains {
		if cfg.Domains[i].Name() == name {
			return &cfg.Domains[i]
		}
	}
	return nil
}

// CheckDestination checks destination_vm names a qube; "" is dom0 (a local path).
func (p *Profile) CheckDestination(cfg *config.Config) (string, error) {
	d := findDomain(cfg, p.DestinationVM)
	if d == nil {
		return "", &ProfileError{Msg: "Invalid destination_vm specified in backup profile", Err: ErrProfileInvalid}
	}
	if d.Class == "AdminVM" {
		return "", nil
	}
	return d.Name(), nil
}

// Volume is what a backup needs of a <volume> of a qube's volume-config.
type Volume struct {
	Name            string `xml:"name,attr"`
	Pool            string `xml:"pool,attr"`
	VID             string `xml:"vid,attr"`
	Size            string `xml:"size,attr"`
	SaveOnStop      string `xml:"save_on_stop,attr"`
	SnapOnStart     string `xml:"snap_on_start,attr"`
	RevisionsToKeep string `xml:"revisions_to_keep,attr"`
}

// SnapshotsDisabled is qubesd's Volume.snapshots_disabled.
func (v Volume) SnapshotsDisabled() bool {
	return v.RevisionsToKeep == "-1" && v.SnapOnStart != "True" && v.SaveOnStop == "True"
}

// Volumes parses a qube's volume-config.
func Volumes(d *config.Domain) []Volume {
	var vc struct {
		Volumes []Volume `xml:"volume"`
	}
	if d.VolumeConfig != "" {
		xml.Unmarshal([]byte(d.VolumeConfig), &vc)
	}
	return vc.Volumes
}

// QID is the qube's qid (from its id "domain-<qid>").
func QID(d *config.Domain) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(d.ID, "domain-"))
	return n
}

func hasTag(d *config.Domain, t string) bool { return slices.Contains(d.Tags, t) }

// matches is qubesd's match_vm_name_with_special.
func matches(d *config.Domain, name string) bool {
	switch {
	case strings.HasPrefix(name, "@tag:"):
		return hasTag(d, name[len("@tag:"):])
	case strings.HasPrefix(name, "@type:"):
		return name[len("@type:"):] == d.Class
	}
	return name == d.Name()
}

// Select returns the qubes the profile backs up, in qid order, and the names of the
// others, sorted (qubesd's "VMs not selected for backup").
func (p *Profile) Select(cfg *config.Config) (selected []*config.Domain, others []string) {
	for i := range cfg.Domains {
		d := &cfg.Domains[i]
		in := false
		if p.Include == nil {
			v, set := d.Property("include_in_backups")
			in = !set || v == "True"
		} else {
			for _, n := range p.Include {
				in = in || matches(d, n)
			}
		}
		for _, n := range p.Exclude {
			// qubesd's exclude list holds names of matching qubes
			if matches(d, n) {
				in = false
			}
		}
		if in {
			selected = append(selected, d)
		} else {
			others = append(others, d.Name())
		}
	}
	slices.SortStableFunc(selected, func(a, b *config.Domain) int { return QID(a) - QID(b) })
	slices.Sort(others)
	return selected, others
}
