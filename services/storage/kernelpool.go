package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// kernelDriver serves read-only kernel volumes: each directory under dir_path is a
// kernel version, and a qube's kernel volume is the version its kernel property names.
type kernelDriver struct{}

func (kernelDriver) Name() string    { return "linux-kernel" }
func (kernelDriver) Params() []Param { return []Param{{"dir_path", true}} }

func (kernelDriver) Open(cfg PoolConfig, host Host) (Pool, error) {
	p := &kernelPool{host: host}
	p.name, _ = cfg.Get("name")
	var ok bool
	if p.dir, ok = cfg.Get("dir_path"); !ok {
		return nil, fmt.Errorf("%w: no dir_path", ErrBadOption)
	}
	return p, nil
}

type kernelPool struct {
	name, dir string // dir as configured (qubesd keeps it as given)
	host      Host
}

var _ Pool = (*kernelPool)(nil)

func (p *kernelPool) Config() PoolConfig {
	return PoolConfig{{"name", p.name}, {"dir_path", p.dir}, {"driver", "linux-kernel"}}
}

func (p *kernelPool) local() string {
	if p.host.Root == "" {
		return p.dir
	}
	return filepath.Join(p.host.Root, p.dir)
}

func (p *kernelPool) Setup(context.Context) error   { return nil }
func (p *kernelPool) Destroy(context.Context) error { return nil }

// Usage: qubesd's LinuxKernel pool reports neither size nor usage.
func (p *kernelPool) Usage() (int64, int64, bool) { return 0, 0, false }
func (p *kernelPool) DirPath() string             { return filepath.Clean(p.dir) }

// Listed returns the installed kernel versions, sorted.
func (p *kernelPool) Listed() []string {
	ents, err := os.ReadDir(p.local())
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

func (p *kernelPool) Create(context.Context, Volume) error { return nil }
func (p *kernelPool) Remove(context.Context, Volume) error { return nil }
func (p *kernelPool) Size(Volume) int64                    { return 0 }
func (p *kernelPool) UsageOf(Volume) int64                 { return 0 }
func (p *kernelPool) Path(v Volume) string {
	if v.VID == "" {
		return ""
	}
	return filepath.Join(p.dir, v.VID, "modules.img")
}
func (p *kernelPool) Revisions(Volume) ([]Revision, error) { return nil, nil }
func (p *kernelPool) IsOutdated(Volume, *Source) bool      { return false }
func (p *kernelPool) Resize(context.Context, Volume, int64) error {
	return fmt.Errorf("%w: resize of a kernel volume", ErrNotSupported)
}
func (p *kernelPool) Revert(context.Context, Volume, string) error {
	return fmt.Errorf("%w: revert of a kernel volume", ErrNotSupported)
}
func (p *kernelPool) Import(context.Context, Volume, *Source) error {
	return fmt.Errorf("%w: import into a kernel volume", ErrNotSupported)
}
func (p *kernelPool) Clear(context.Context, Volume) error {
	return fmt.Errorf("%w: import_data of a kernel volume", ErrNotSupported)
}
func (p *kernelPool) Start(context.Context, Volume, *Source) error { return nil }

// Verify is qubesd's LinuxModules.verify: a kernel named must have its vmlinuz,
// "Missing image file: <dir>/<vid>/vmlinuz". A kernel directory that does not exist
// at all is not checked (a host whose kernels were never installed, as a fixture's).
func (p *kernelPool) Verify(v Volume, _ *Source) error {
	if v.VID == "" || !missing(filepath.Join(p.local(), v.VID, "vmlinuz")) {
		return nil
	}
	return qerr.StoragePoolException("Missing image file: " + filepath.Join(p.dir, v.VID, "vmlinuz"))
}
func (p *kernelPool) Stop(context.Context, Volume) error    { return nil }
func (p *kernelPool) IsDirty(Volume) bool                   { return false }
func (p *kernelPool) Discard(context.Context, Volume) error { return nil }
