package storage

import (
	"context"
	"errors"
	"time"
)

// Driver makes pools of one kind (qubesd's storage entry points). Params are the
// options admin.pool.Add accepts, in qubesd's order, and whether each is required.
type Driver interface {
	Name() string
	Params() []Param
	// Open returns the pool a configuration describes (every attribute of <pool>,
	// name and driver included). It checks and normalises the options and touches
	// nothing on disk: Setup does, when the pool is added.
	Open(cfg PoolConfig, host Host) (Pool, error)
}

// Param is one driver option.
type Param struct {
	Name     string
	Required bool
}

// PoolConfig is a pool's configuration as qubes.xml keeps it, attributes in order.
type PoolConfig []KV

// KV is one attribute.
type KV struct{ Key, Value string }

// Get returns an attribute's value and whether it is there.
func (c PoolConfig) Get(key string) (string, bool) {
	for _, kv := range c {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return "", false
}

// Host is what drivers need of the machine they run on.
type Host struct {
	// Root prefixes every absolute path of a pool (its dir_path): "" or "/" is the
	// real filesystem; a data dir maps the fixture's /var/lib/qubes into it.
	Root string
	// StatFS reports the size and usage in bytes of the filesystem holding path.
	StatFS func(path string) (size, used int64, err error)
	// Stamp, if set, is the modification time every image gets when it is written
	// (a simulated host whose revision names must not depend on the clock).
	Stamp *time.Time
	// sim keeps the simulated pools' volumes (the host's share of QUBES_SIMPOOLS);
	// simulated pools cannot open without it.
	sim *simStore
}

// Pool is one storage pool. Volumes are addressed by their settings (Volume, from
// qubes.xml); a pool keeps their data (images, revisions) and reports what it knows
// better than the settings (the current size, the usage).
//
// A volume whose data was never created (a fixture's qube) reads as an empty image of
// its configured size; operations that write it create it first.
type Pool interface {
	// Config is the configuration written to qubes.xml (qubesd's Pool.config order).
	Config() PoolConfig
	// Setup prepares a newly added pool (its directory); Destroy undoes it on removal.
	Setup(ctx context.Context) error
	Destroy(ctx context.Context) error
	// Usage reports size and usage; ok is false when the pool cannot tell (qubesd
	// then prints neither).
	Usage() (size, used int64, ok bool)
	// DirPath is the directory holding the pool's data ("" if it has none): a pool
	// whose DirPath holds another's is that one's included_in.
	DirPath() string
	// Listed returns the vids the pool itself knows beyond the qubes' settings (the
	// kernels of a linux-kernel pool); nil for the others.
	Listed() []string

	Create(ctx context.Context, v Volume) error
	Remove(ctx context.Context, v Volume) error
	// Size and UsageOf of a volume: from its data when it has some, else its settings.
	Size(v Volume) int64
	UsageOf(v Volume) int64
	// Path is the path qubesd reports for the volume (Info's path=).
	Path(v Volume) string
	// Revisions returns the volume's revisions, oldest first.
	Revisions(v Volume) ([]Revision, error)
	// IsOutdated reports whether a snap_on_start volume's snapshot is older than its
	// source (src is the source volume's settings and pool).
	IsOutdated(v Volume, src *Source) bool
	Resize(ctx context.Context, v Volume, size int64) error
	// Revert makes a revision the volume's data, keeping the current data as a new
	// revision; ErrNoRevision for an unknown one.
	Revert(ctx context.Context, v Volume, revision string) error
	// Import replaces the volume's data with a copy of src's (a clone) and commits it
	// as after a stop; Clear with an empty image of its size.
	Import(ctx context.Context, v Volume, src *Source) error
	Clear(ctx context.Context, v Volume) error
	// Verify is qubesd's Volume.verify, before a start: a *qerr.Error
	// (StoragePoolException, the driver's text) when data the start needs is missing
	// (the committed image of a save_on_stop volume, the source's of a snap_on_start
	// one). Data never written (a fixture's qube, whose directory does not exist
	// either) is not missing: it reads as an empty image.
	Verify(v Volume, src *Source) error
	// Start prepares the volume for a start of its qube (a snap_on_start volume takes a
	// snapshot of src; a volatile one is emptied); Stop commits a save_on_stop volume as
	// a new revision, dropping those beyond revisions_to_keep, and discards the rest.
	Start(ctx context.Context, v Volume, src *Source) error
	Stop(ctx context.Context, v Volume) error
	// IsDirty reports whether a save_on_stop volume has a running copy that was not
	// committed (its qube runs, or stopped uncleanly): qubesd's is_dirty.
	IsDirty(v Volume) bool
	// Discard undoes a Start of a volume that was not dirty, for a start that failed
	// before its qube ran: the running copy goes without a commit, and the committed
	// data and revisions stay as they were.
	Discard(ctx context.Context, v Volume) error
}

// Source is another volume and its pool: the origin of a clone or a snapshot.
type Source struct {
	Volume Volume
	Pool   Pool
}

// Revision is one kept revision of a volume.
type Revision struct {
	ID   string
	Time time.Time
}

// Errors drivers return; the service maps them to qubesd's outcomes.
var (
	// ErrNoRevision: Revert to a revision the volume does not have (qubesd aborts).
	ErrNoRevision = errors.New("no such revision")
	// ErrReadOnly: a write to a read-only volume (a kernel).
	ErrReadOnly = errors.New("read-only volume")
	// ErrNotSupported: an operation the driver does not implement (qubesd's
	// NotImplementedError, which aborts the call).
	ErrNotSupported = errors.New("not supported by the pool driver")
	// ErrBadOption: a pool option the driver cannot use.
	ErrBadOption = errors.New("bad pool option")
)

// exporter is a pool whose volumes can be read as an image file (the file pools), so
// that an import into a file pool copies it; other sources import as empty images.
type exporter interface {
	ExportPath(v Volume) (string, bool)
}
