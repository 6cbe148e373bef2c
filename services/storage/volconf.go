package storage

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Volume is one <volume> of a qube's <volume-config>: the settings qubes.xml keeps.
// What the pool holds (image files, revisions, the current size) its driver knows.
type Volume struct {
	Name            string
	Pool            string
	VID             string
	RevisionsToKeep int
	RW              bool
	SaveOnStop      bool
	SnapOnStart     bool
	// Ephemeral is the explicitly set value; nil takes the default (Volume.ephemeral in
	// qubesd: the pool's ephemeral_volatile for a plain writable volume).
	Ephemeral *bool
	Size      int64  // bytes; 0 is not written
	Source    string // vid of the source volume of a snap_on_start volume
}

// pyBool is Python's str(bool).
func pyBool(b bool) string {
	if b {
		return "True"
	}
	return "False"
}

// parseVolumeConfig reads a qube's <volume-config> element (empty: no volumes).
func parseVolumeConfig(raw config.RawXML) ([]Volume, error) {
	if strings.TrimSpace(string(raw)) == "" {
		return nil, nil
	}
	dec := xml.NewDecoder(strings.NewReader(string(raw)))
	var out []Volume
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("volume-config: %w", err)
		}
		se, ok := tok.(xml.StartElement)
		if !ok || se.Name.Local != "volume" {
			continue
		}
		v := Volume{}
		for _, a := range se.Attr {
			val := a.Value
			switch a.Name.Local {
			case "name":
				v.Name = val
			case "pool":
				v.Pool = val
			case "vid":
				v.VID = val
			case "revisions_to_keep":
				v.RevisionsToKeep, err = strconv.Atoi(val)
			case "rw":
				v.RW = val == "True"
			case "save_on_stop":
				v.SaveOnStop = val == "True"
			case "snap_on_start":
				v.SnapOnStart = val == "True"
			case "ephemeral":
				b := val == "True"
				v.Ephemeral = &b
			case "size":
				v.Size, err = strconv.ParseInt(val, 10, 64)
			case "source":
				v.Source = val
			}
			if err != nil {
				return nil, fmt.Errorf("volume-config: volume %q: %s=%q: %w", v.Name, a.Name.Local, val, err)
			}
		}
		out = append(out, v)
	}
}

// renderVolumeConfig writes volumes as qubesd does (Volume.config: name, pool, vid,
// revisions_to_keep, rw, save_on_stop, snap_on_start, then ephemeral if set, size if
// not zero, source if any), in the layout the properties service writes for a new qube.
func renderVolumeConfig(vols []Volume) config.RawXML {
	if len(vols) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("<volume-config>\n")
	for _, v := range vols {
		attr := func(k, val string) {
			b.WriteString(" " + k + "=\"")
			_ = xml.EscapeText(&b, []byte(val))
			b.WriteString("\"")
		}
		b.WriteString("  <volume")
		attr("name", v.Name)
		attr("pool", v.Pool)
		attr("vid", v.VID)
		attr("revisions_to_keep", strconv.Itoa(v.RevisionsToKeep))
		attr("rw", pyBool(v.RW))
		attr("save_on_stop", pyBool(v.SaveOnStop))
		attr("snap_on_start", pyBool(v.SnapOnStart))
		if v.Ephemeral != nil {
			attr("ephemeral", pyBool(*v.Ephemeral))
		}
		if v.Size != 0 {
			attr("size", strconv.FormatInt(v.Size, 10))
		}
		if v.Source != "" {
			attr("source", v.Source)
		}
		b.WriteString("/>\n")
	}
	b.WriteString("</volume-config>")
	return config.RawXML(b.String())
}
