// Package buildinfo tells which build of qubesbus is running, from the Go build
// information: every service announces it in micro discovery, and the CLI prints it.
package buildinfo

import (
	"runtime/debug"
	"strings"
	"sync"
)

// Info is what the build recorded.
type Info struct {
	// Module is the main module's version ("(devel)" for a build from a work tree).
	Module string
	// Revision is the VCS revision and Modified whether the tree had changes; empty
	// when the build did not record them (go test, go run of a file list).
	Revision string
	Modified bool
	Go       string // toolchain
}

var read = sync.OnceValue(func() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{Module: "(devel)"}
	}
	in := Info{Module: bi.Main.Version, Go: bi.GoVersion}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
})

// Read returns the build information of the running binary.
func Read() Info { return read() }

// Version is a semantic version for micro discovery, which accepts nothing else: the
// module version of a released build, else 0.0.0-dev with the short revision (and
// "dirty" for a modified tree) as build metadata.
func Version() string { return read().semver() }

func (in Info) semver() string {
	if v, ok := strings.CutPrefix(in.Module, "v"); ok && v != "" {
		return v
	}
	v := "0.0.0-dev"
	var meta []string
	if in.Revision != "" {
		meta = append(meta, in.Revision[:min(12, len(in.Revision))])
	}
	if in.Modified {
		meta = append(meta, "dirty")
	}
	if len(meta) > 0 {
		v += "+" + strings.Join(meta, ".")
	}
	return v
}
