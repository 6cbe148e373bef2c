package backup

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Item is one file of a qube in the backup.
type Item struct {
	Name   string // in the archive, under the qube's subdir: "private.img", "firewall.xml"
	Size   int64  // its usage (qubesd: volume.usage, or the file's disk usage)
	Volume *Volume
	Data   []byte // for files kept in the configuration (firewall.xml)
}

// Entry is one qube of the backup.
type Entry struct {
	Domain *config.Domain
	Subdir string // "vm5/"
	Items  []Item
}

// Size is the sum of the entry's items.
func (e Entry) Size() int64 {
	var n int64
	for _, it := range e.Items {
		n += it.Size
	}
	return n
}

// Plan lists the files of the selected qubes as qubesd's get_files_to_backup: each
// volume that is saved on stop as <name>.img, the firewall.xml if the qube has one,
// and a qube with nothing still gets its directory (an empty file in qubesd; here an
// entry with no items). dom0 (its user's home) has no files here.
func Plan(selected []*config.Domain, usage func(d *config.Domain, v Volume) int64) []Entry {
	var plan []Entry
	for _, d := range selected {
		qid := QID(d)
		e := Entry{Domain: d, Subdir: fmt.Sprintf("vm%d/", qid)}
		if qid == 0 {
			e.Subdir = "dom0-home/"
			plan = append(plan, e)
			continue
		}
		for _, v := range Volumes(d) {
			if v.SaveOnStop != "True" {
				continue
			}
			v := v
			e.Items = append(e.Items, Item{Name: v.Name + ".img", Size: usage(d, v), Volume: &v})
		}
		if d.Firewall != "" {
			// qubesd: the disk usage of the file, a block of 4 KiB for a small one.
			e.Items = append(e.Items, Item{Name: "firewall.xml", Size: (int64(len(d.Firewall)) + 4095) / 4096 * 4096, Data: []byte(d.Firewall)})
		}
		plan = append(plan, e)
	}
	return plan
}

// Running reports whether a qube is not halted (for the summary's warnings).
type Running func(name string) bool

// Summary is qubesd's Backup.get_backup_summary.
func Summary(plan []Entry, others []string, running Running) string {
	widths := []int{16, 12, 12}
	var b strings.Builder
	rule := func() {
		for _, w := range widths {
			b.WriteString(strings.Repeat("-", w+1) + "-+")
		}
		b.WriteString("\n")
	}
	cell := func(w int, s string) { fmt.Fprintf(&b, "%*s |", w+1, s) }
	rule()
	for i, n := range []string{"VM", "type", "size"} {
		cell(widths[i], n)
	}
	b.WriteString("\n")
	rule()
	var total int64
	for _, e := range plan {
		d := e.Domain
		cell(widths[0], d.Name())
		qid := QID(d)
		switch {
		case qid == 0:
			cell(widths[1], "User home")
		case d.Class == "TemplateVM":
			cell(widths[1], "Template VM")
		case d.Class == "StandaloneVM":
			cell(widths[1], "VM + Sys") // updateable
		default:
			cell(widths[1], "VM")
		}
		cell(widths[2], SizeToHuman(e.Size()))
		total += e.Size()
		if qid != 0 && running != nil && running(d.Name()) {
			disabled := false
			for _, v := range Volumes(d) {
				disabled = disabled || v.SnapshotsDisabled()
			}
			if disabled {
				b.WriteString(" <-- The VM is running and private volume snapshots are disabled. Backup will fail!")
			} else {
				b.WriteString(" <-- The VM is running, backup will contain its state from before its start!")
			}
		}
		b.WriteString("\n")
	}
	rule()
	cell(widths[0], "Total size:")
	cell(widths[1]+1+2+widths[2], SizeToHuman(total))
	b.WriteString("\n")
	rule()
	b.WriteString("VMs not selected for backup:\n - " + strings.Join(others, "\n - ") + "\n")
	return b.String()
}

// SizeToHuman is qubesd's qubes.utils.size_to_human: bytes below 1 KiB, else one
// decimal of KiB, MiB or GiB (Python's round and str of a float).
func SizeToHuman(n int64) string {
	f := float64(n)
	switch {
	case n < 1024:
		return strconv.FormatInt(n, 10)
	case n < 1024*1024:
		return strconv.FormatFloat(f/1024, 'f', 1, 64) + " KiB"
	case n < 1024*1024*1024:
		return strconv.FormatFloat(f/(1024*1024), 'f', 1, 64) + " MiB"
	}
	return strconv.FormatFloat(f/(1024*1024*1024), 'f', 1, 64) + " GiB"
}
