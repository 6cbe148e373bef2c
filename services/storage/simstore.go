package storage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// SimBucket holds the metadata of every simulated volume (key <host>.<pool>.<vid>,
// each part one key token: simKey), so that all storage instances of a host see the
// same simulated volumes.
const SimBucket = "QUBES_SIMPOOLS"

// ErrSimConflict: a simulated volume kept changing under a compare-and-set.
var ErrSimConflict = errors.New("simulated volume changed concurrently")

// OpenSimBucket opens the simulated volumes' bucket, creating it if needed (qubesbus
// setup and each storage instance).
func OpenSimBucket(ctx context.Context, js jetstream.JetStream, replicas int, log *slog.Logger) (jetstream.KeyValue, error) {
	if replicas == 0 {
		replicas = 1
	}
	kv, err := bus.OpenKV(ctx, js, log, jetstream.KeyValueConfig{Bucket: SimBucket,
		Replicas: replicas, Storage: jetstream.FileStorage, History: 1})
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", SimBucket, err)
	}
	return kv, nil
}

// simRecord is one simulated volume's data.
type simRecord struct {
	Pool  string     `json:"pool"`
	VID   string     `json:"vid"`
	Size  int64      `json:"size"`
	Dirty bool       `json:"dirty,omitempty"`
	Revs  []Revision `json:"revs,omitempty"`
	Next  int        `json:"next"`
}

func (r *simRecord) clone() *simRecord {
	if r == nil {
		return nil
	}
	c := *r
	c.Revs = append([]Revision(nil), r.Revs...)
	return &c
}

// cachedRec is the newest version of a key this instance knows: rev is its stream
// sequence, rec nil when the key is absent or deleted.
type cachedRec struct {
	rev uint64
	rec *simRecord
}

// simStore is the host's simulated volumes: the bucket, and a cache of this host's
// keys kept by a watcher. Reads (sizes, revisions, a pool's usage) come from the
// cache, so a listing of thousands of qubes makes no KV read; every change is a
// compare-and-set on the key's revision, retried on the current value when another
// instance came first. Sync makes the cache as new as the bucket before a call reads
// it, so a call served here sees what a call served by another instance wrote.
//
// The watcher follows the whole bucket (other hosts' keys are skipped), so that the
// stream's last sequence, which the server keeps at hand, is what Sync waits for: the
// last sequence of this host's keys alone costs the server a walk over every key
// (3 ms a call at 20 000 volumes). Writes are rare next to reads (starts, stops,
// resizes), so following other hosts' costs little.
type simStore struct {
	kv     jetstream.KeyValue
	nc     *nats.Conn
	prefix string // <host>.
	log    *slog.Logger

	mu      sync.Mutex
	pools   map[string]map[string]cachedRec // pool → vid → newest known
	hashed  map[string][2]string            // a key with a hashed part → its pool and vid
	applied uint64                          // stream sequence the watcher reached (any host's)
	moved   chan struct{}                   // closed when applied advances
}

// maxSimKeyPart bounds the encoded form of a pool name or vid in a key. A key is a
// NATS subject ($KV.QUBES_SIMPOOLS.<key>), whose protocol line the server refuses
// beyond 4096 bytes (bus.MaxControlLine); a client chooses a pool's name, of any
// length up to its 64 KiB request, as qubesd sets no limit.
const maxSimKeyPart = 128

// simKey is the key of a pool's volume: <prefix><pool>.<vid>, each part "_" and its
// base64url form (any name is one key token), or, when that is longer than
// maxSimKeyPart, "=" and the hex SHA-256 of the name (base64url has no '='). A hashed
// part cannot be read back from the key: the record holds the names (simRecord.Pool,
// VID), and the store remembers them for the key's deletion (simStore.hashed).
func simKey(prefix, pool, vid string) string {
	return prefix + simKeyPart(pool) + "." + simKeyPart(vid)
}

func simKeyPart(name string) string {
	enc := base64.RawURLEncoding.EncodeToString([]byte(name))
	if len(enc) <= maxSimKeyPart-1 {
		return "_" + enc
	}
	sum := sha256.Sum256([]byte(name))
	return "=" + hex.EncodeToString(sum[:])
}

// parseSimKey reads a key of prefix back: the pool name and vid, or, when a part is
// hashed, hashed true and the names unknown.
func parseSimKey(prefix, key string) (pool, vid string, hashed, ok bool) {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return "", "", false, false
	}
	a, b, ok := strings.Cut(rest, ".")
	if !ok {
		return "", "", false, false
	}
	p, hp, ok1 := parseSimKeyPart(a)
	v, hv, ok2 := parseSimKeyPart(b)
	if !ok1 || !ok2 {
		return "", "", false, false
	}
	if hp || hv {
		return "", "", true, true
	}
	return p, v, false, true
}

func parseSimKeyPart(part string) (name string, hashed, ok bool) {
	if h, isHash := strings.CutPrefix(part, "="); isHash {
		_, err := hex.DecodeString(h)
		return "", true, err == nil && len(h) == 2*sha256.Size
	}
	enc, isB64 := strings.CutPrefix(part, "_")
	if !isB64 {
		return "", false, false
	}
	n, err := base64.RawURLEncoding.DecodeString(enc)
	return string(n), false, err == nil
}

// openSimStore starts the watcher of host's keys and returns once the cache holds
// what the bucket held; the watcher stops with ctx.
func openSimStore(ctx context.Context, nc *nats.Conn, kv jetstream.KeyValue, host string, log *slog.Logger) (*simStore, error) {
	st := &simStore{kv: kv, nc: nc, prefix: host + ".", log: log,
		pools: map[string]map[string]cachedRec{}, hashed: map[string][2]string{}, moved: make(chan struct{})}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", SimBucket, err)
	}
	for loaded := false; !loaded; {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("watch %s: closed while loading", SimBucket)
			}
			if e == nil {
				loaded = true // the initial values are in
				continue
			}
			st.apply(e)
		case <-ctx.Done():
			_ = w.Stop()
			return nil, ctx.Err()
		}
	}
	go func() {
		for e := range w.Updates() {
			if e != nil {
				st.apply(e)
			}
		}
	}()
	context.AfterFunc(ctx, func() { _ = w.Stop() })
	return st, nil
}

// apply takes a watched entry into the cache. The names of a key with a hashed part
// come from its record, and for its deletion from the record seen before.
func (st *simStore) apply(e jetstream.KeyValueEntry) {
	pool, vid, hashed, ok := parseSimKey(st.prefix, e.Key())
	var rec *simRecord
	if ok && e.Operation() == jetstream.KeyValuePut {
		rec = new(simRecord)
		if err := json.Unmarshal(e.Value(), rec); err != nil {
			st.log.Warn("unreadable simulated volume", "key", e.Key(), "err", err)
			ok = false
		} else if hashed {
			pool, vid = rec.Pool, rec.VID
			if simKey(st.prefix, pool, vid) != e.Key() {
				st.log.Warn("simulated volume under another key", "key", e.Key(), "pool", cloudevent.LogName(pool), "vid", cloudevent.LogName(vid))
				ok = false
			}
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if ok && hashed {
		if rec != nil {
			st.hashed[e.Key()] = [2]string{pool, vid}
		} else {
			names, known := st.hashed[e.Key()]
			pool, vid, ok = names[0], names[1], known
		}
	}
	if ok {
		st.put(pool, vid, e.Revision(), rec)
	}
	if e.Revision() > st.applied {
		st.applied = e.Revision()
		close(st.moved)
		st.moved = make(chan struct{})
	}
}

// put records a version of a key unless a newer one is known. Lock held.
func (st *simStore) put(pool, vid string, rev uint64, rec *simRecord) {
	m := st.pools[pool]
	if m == nil {
		m = map[string]cachedRec{}
		st.pools[pool] = m
	}
	if cur, ok := m[vid]; ok && cur.rev > rev {
		return
	}
	m[vid] = cachedRec{rev: rev, rec: rec}
}

// get returns a copy of a volume's record (nil: none) and its revision.
func (st *simStore) get(pool, vid string) (*simRecord, uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	c := st.pools[pool][vid]
	return c.rec.clone(), c.rev
}

// each calls f on every volume of a pool (under the lock: f must not block).
func (st *simStore) each(pool string, f func(vid string, r *simRecord)) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for vid, c := range st.pools[pool] {
		if c.rec != nil {
			f(vid, c.rec)
		}
	}
}

// streamInfoReply is the part of a $JS.API.STREAM.INFO answer Sync reads.
type streamInfoReply struct {
	State *struct {
		LastSeq uint64 `json:"last_seq"`
	} `json:"state"`
	Error *struct {
		Code    int    `json:"code"`
		ErrCode uint16 `json:"err_code"`
		Desc    string `json:"description"`
	} `json:"error"`
}

// Sync waits until the cache holds every change the bucket had when it was called.
// It asks the stream leader (STREAM.INFO, answered by the leader, unlike a direct
// get that a lagging replica may answer) for the stream's last sequence: one request,
// whatever the number of volumes.
func (st *simStore) Sync(ctx context.Context) error {
	msg, err := st.nc.RequestWithContext(ctx, "$JS.API.STREAM.INFO.KV_"+SimBucket, nil)
	if err != nil {
		return fmt.Errorf("sync %s: %w", SimBucket, err)
	}
	var rep streamInfoReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("sync %s: %w", SimBucket, err)
	}
	if rep.Error != nil {
		return fmt.Errorf("sync %s: %s (%d)", SimBucket, rep.Error.Desc, rep.Error.ErrCode)
	}
	if rep.State == nil {
		return fmt.Errorf("sync %s: no stream state", SimBucket)
	}
	for {
		st.mu.Lock()
		done, moved := st.applied >= rep.State.LastSeq, st.moved
		st.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-moved:
		case <-ctx.Done():
			return fmt.Errorf("sync %s: %w", SimBucket, ctx.Err())
		}
	}
}

// change applies f to a volume's record as a compare-and-set on its revision: f gets
// a copy of the current record (nil: none) and returns the new one (nil: delete it).
// When another instance changed the key meanwhile, the current value is read and f
// runs again on it. Nothing is written when f changes nothing.
func (st *simStore) change(ctx context.Context, pool, vid string, f func(cur *simRecord) (*simRecord, error)) error {
	key := simKey(st.prefix, pool, vid)
	for range 16 {
		cur, rev := st.get(pool, vid)
		next, err := f(cur.clone())
		if err != nil {
			return err
		}
		if next != nil {
			next.Pool, next.VID = pool, vid
		}
		if sameRecord(cur, next) {
			return nil
		}
		var newRev uint64
		switch {
		case next == nil:
			err = st.kv.Delete(ctx, key, jetstream.LastRevision(rev))
			newRev = rev // the marker's sequence comes with the watcher
		case cur == nil:
			data, _ := json.Marshal(next)
			newRev, err = st.kv.Create(ctx, key, data)
		default:
			data, _ := json.Marshal(next)
			newRev, err = st.kv.Update(ctx, key, data, rev)
		}
		if err == nil {
			st.mu.Lock()
			st.put(pool, vid, newRev, next)
			st.mu.Unlock()
			return nil
		}
		if !casConflict(err) {
			return fmt.Errorf("simulated volume %s:%s: %w", pool, vid, err)
		}
		if err := st.refresh(ctx, pool, vid, key, rev); err != nil {
			return err
		}
	}
	return fmt.Errorf("%w: %s:%s", ErrSimConflict, pool, vid)
}

// refresh reads a key whose cached version is stale.
func (st *simStore) refresh(ctx context.Context, pool, vid, key string, stale uint64) error {
	e, err := st.kv.Get(ctx, key)
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		// Deleted (the marker's sequence is unknown here): absent, at least as new as
		// what was cached.
		st.put(pool, vid, stale, nil)
		return nil
	case err != nil:
		return fmt.Errorf("simulated volume %s:%s: %w", pool, vid, err)
	}
	rec := new(simRecord)
	if err := json.Unmarshal(e.Value(), rec); err != nil {
		return fmt.Errorf("simulated volume %s:%s: %w", pool, vid, err)
	}
	st.put(pool, vid, e.Revision(), rec)
	return nil
}

// casConflict reports a compare-and-set that lost to another writer.
func casConflict(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) ||
		(errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)) // R>1 streams answer 10164
}

func sameRecord(a, b *simRecord) bool {
	if a == nil || b == nil {
		return a == b
	}
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}
