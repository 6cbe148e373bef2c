package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync/atomic"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// DevicesBucket holds the device watch's record of every backend (qubesd's
// devices_cache): one key per host and backend qube, <host>.<backend>, whose value is
// the backend's block devices, port id → frontend ("" when not attached). It lives
// in the bus rather than in an instance so that several devices instances of a host
// share it: each change is a compare-and-set on the key's revision, and the events
// of a change are published only by the instance whose write succeeded.
const DevicesBucket = "QUBES_DEVICES"

// ErrRecordConflict is returned when a record kept changing under every retry.
var ErrRecordConflict = errors.New("devices: device record changed by another instance too often")

// OpenDevicesBucket opens the device-record bucket, creating it (file storage, last
// value only) when it does not exist. An existing bucket is left as it is: a service
// running as its own NATS user may not update it, `qubesbus setup` made it.
func OpenDevicesBucket(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	if replicas < 1 {
		replicas = 1
	}
	kv, err := bus.OpenKV(ctx, js, nil, jetstream.KeyValueConfig{Bucket: DevicesBucket,
		Description: "device watch: each backend's block devices and their frontends, per host",
		History:     1, Storage: jetstream.FileStorage, Replicas: replicas})
	if err != nil {
		return nil, fmt.Errorf("devices bucket %s: %w", DevicesBucket, err)
	}
	return kv, nil
}

// records reads and writes a host's backend records.
//
// A record holds the hypervisor boot it was written under (hostdev.Inventory.Boot).
// A host that restarts has new domains and no attachments; the bucket outlives it, so
// a record of an earlier boot reads as no record at all, as qubesd's cache is empty
// after it restarts, and a backend that starts again announces its devices as added.
type records struct {
	kv   jetstream.KeyValue
	host string       // escaped key token of the host
	boot atomic.Value // string: the hypervisor's boot, as last seen
}

// recordValue is a record as stored: the ports (port id → frontend, "" when not
// attached) and the boot they were seen under.
type recordValue struct {
	Boot  string            `json:"boot,omitempty"`
	Ports map[string]string `json:"ports"`
}

// seeBoot records the boot the hypervisor reports now ("" leaves it as it is).
func (r *records) seeBoot(boot string) {
	if boot != "" {
		r.boot.Store(boot)
	}
}

func (r *records) currentBoot() string {
	b, _ := r.boot.Load().(string)
	return b
}

func newRecords(kv jetstream.KeyValue, host subject.Host) *records {
	return &records{kv: kv, host: subject.KVToken(host.ID())}
}

func (r *records) key(backend string) string { return r.host + "." + subject.KVToken(backend) }

// get returns a backend's record and its revision (0 and an empty record when there
// is none).
func (r *records) get(ctx context.Context, backend string) (map[string]string, uint64, error) {
	e, err := r.kv.Get(ctx, r.key(backend))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return map[string]string{}, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("read device record of %s: %w", backend, err)
	}
	var v recordValue
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		return nil, 0, fmt.Errorf("device record of %s: %w", backend, err)
	}
	if v.Ports == nil || v.Boot != r.currentBoot() {
		return map[string]string{}, e.Revision(), nil // of an earlier boot: gone with it
	}
	return v.Ports, e.Revision(), nil
}

// errStale: the record changed since it was read.
var errStale = errors.New("device record changed meanwhile")

// put writes a record read at rev (0: there was none), failing with errStale when
// another writer came first.
func (r *records) put(ctx context.Context, backend string, ports map[string]string, rev uint64) error {
	if ports == nil {
		ports = map[string]string{}
	}
	data, err := json.Marshal(recordValue{Boot: r.currentBoot(), Ports: ports})
	if err != nil {
		return err
	}
	if rev == 0 {
		_, err = r.kv.Create(ctx, r.key(backend), data)
	} else {
		_, err = r.kv.Update(ctx, r.key(backend), data, rev)
	}
	var apiErr *jetstream.APIError
	if errors.Is(err, jetstream.ErrKeyExists) || errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return errStale
	}
	if err != nil {
		return fmt.Errorf("write device record of %s: %w", backend, err)
	}
	return nil
}

// create writes a backend's record unless it has one of this boot: an instance that
// starts never overwrites what a running one recorded (it would swallow the events of
// a change that one is about to handle).
func (r *records) create(ctx context.Context, backend string, ports map[string]string) error {
	for attempt := 0; attempt < maxRetries; attempt++ {
		e, err := r.kv.Get(ctx, r.key(backend))
		var rev uint64
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return fmt.Errorf("read device record of %s: %w", backend, err)
		default:
			var v recordValue
			if json.Unmarshal(e.Value(), &v) == nil && v.Ports != nil && v.Boot == r.currentBoot() {
				return nil
			}
			rev = e.Revision()
		}
		if err := r.put(ctx, backend, ports, rev); !errors.Is(err, errStale) {
			return err
		}
	}
	return fmt.Errorf("%w: %s", ErrRecordConflict, backend)
}

// modify reads a backend's record, lets f compute the new one from it and writes
// that back only if nobody wrote the record meanwhile; otherwise it reads it again
// and calls f again. f must compute everything (its events too) from the record it
// is given, so that what the last call returned is what happened, exactly once.
// f returns nil to leave the record as it is.
func (r *records) modify(ctx context.Context, backend string, f func(old map[string]string) map[string]string) error {
	for attempt := 0; attempt < maxRetries; attempt++ {
		old, rev, err := r.get(ctx, backend)
		if err != nil {
			return err
		}
		next := f(maps.Clone(old))
		if next == nil || maps.Equal(old, next) {
			return nil
		}
		err = r.put(ctx, backend, next, rev)
		if !errors.Is(err, errStale) {
			return err
		}
	}
	return fmt.Errorf("%w: %s", ErrRecordConflict, backend)
}

// backends lists the backends of the host that have a record.
func (r *records) backends(ctx context.Context) ([]string, error) {
	lister, err := r.kv.ListKeysFiltered(ctx, r.host+".*")
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list device records: %w", err)
	}
	var out []string
	for k := range lister.Keys() {
		if b, ok := subject.ParseKVToken(strings.TrimPrefix(k, r.host+".")); ok {
			out = append(out, b)
		}
	}
	return out, nil
}
