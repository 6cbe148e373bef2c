// Package indexed is a host configuration with lookup indexes that applies config ops
// incrementally: a batch costs what it touches, not the size of the configuration.
//
// Results are those of config.Apply (the same batches accepted, the same resulting
// configuration, errors wrapping the same sentinels) whenever the configuration the
// batch starts from holds config.CheckInvariants. The fast path depends on that: from a
// valid configuration, a batch can break an invariant only through what it touches (a
// domain it changes, adds or removes, the global properties, the labels), so only those
// are checked, against counters kept for the whole configuration. A configuration that
// does not hold the invariants (say a hand-edited qubes.xml) goes through config.Apply
// itself until a batch makes it valid. TestMatchesConfigApply holds the two together
// on random batches; a change to config.Apply or config.CheckInvariants must keep it
// passing (an op kind added there takes the slow path here until taught).
//
// Copy-on-write: a batch copies a domain, the global properties or the labels before it
// first changes them and never writes to the old copies, so a View taken earlier stays
// intact without a deep copy.
package indexed

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Config is a configuration and its indexes. It is not safe for concurrent use: callers
// lock around it.
type Config struct {
	c     *config.Config
	valid bool // c holds config.CheckInvariants, so the fast path is exact

	pos       map[string]int    // domain id → index in c.Domains
	names     map[string]int    // domain name → how many domains have it
	byName    map[string]string // domain name → id of the first domain with it
	uuids     map[string]int    // uuid property → how many domains have it
	byUUID    map[string]string // uuid property → id of the first domain with it
	qids      map[string]int    // qid property → how many domains have it
	refs      map[string]int    // qube name → how many properties name it
	labels    map[string]int    // label name and "label-<index>" → how many labels have it
	labelRefs map[string]int    // "label" property value → how many properties use it
	stale     bool              // byName/byUUID lost an entry that another domain shares
}

// qubeRefProps are the properties whose value names a qube ("" = none). It repeats
// config's unexported list; TestQubeRefPropsMatchConfig keeps the two in step.
var qubeRefProps = map[string]bool{
	"netvm": true, "template": true, "default_dispvm": true, "management_dispvm": true,
	"audiovm": true, "guivm": true, "default_netvm": true, "default_template": true,
	"clockvm": true, "updatevm": true, "default_guivm": true, "default_audiovm": true,
}

// New indexes c and takes ownership of it: the caller must not change c afterwards.
func New(c *config.Config) *Config {
	x := &Config{c: c}
	x.reindex()
	return x
}

// Config is the live configuration, to read while the caller's lock is held.
func (x *Config) Config() *config.Config { return x.c }

// View returns the configuration as it is now, safe to read after the caller's lock is
// released and while later batches apply: it copies only the top-level struct and the
// domain list and shares everything below, which batches never write again.
func (x *Config) View() *config.Config {
	v := *x.c
	v.Domains = slices.Clone(x.c.Domains)
	return &v
}

// Len is the number of domains.
func (x *Config) Len() int { return len(x.c.Domains) }

// Domain returns the domain with an id.
func (x *Config) Domain(id string) (*config.Domain, bool) {
	i, ok := x.pos[id]
	if !ok {
		return nil, false
	}
	return &x.c.Domains[i], true
}

// ByName returns the domain with a name.
func (x *Config) ByName(name string) (*config.Domain, bool) {
	id, ok := x.byName[name]
	if !ok {
		return nil, false
	}
	return x.Domain(id)
}

// ByUUID returns the domain whose uuid property is uuid.
func (x *Config) ByUUID(uuid string) (*config.Domain, bool) {
	id, ok := x.byUUID[uuid]
	if !ok {
		return nil, false
	}
	return x.Domain(id)
}

// Apply applies a batch of ops atomically: on error nothing changed.
func (x *Config) Apply(ops []config.Op) error {
	_, err := x.Try(ops)
	return err
}

// Try applies a batch like Apply and also returns a function that reverts it. The undo
// must run before the next batch, if at all (persistence applies a batch, then undoes
// it when the change log does not take it).
func (x *Config) Try(ops []config.Op) (undo func(), err error) {
	if x.valid {
		undo, err := x.tryFast(ops)
		if !errors.Is(err, errSlowPath) {
			return undo, err
		}
	}
	return x.trySlow(ops)
}

// errSlowPath makes a batch fall back to config.Apply: it does something the indexes
// do not model (adding a domain whose id is already taken, an op kind unknown here).
var errSlowPath = errors.New("indexed: slow path")

func (x *Config) trySlow(ops []config.Op) (func(), error) {
	old := *x.c // config.Apply replaces every slice, so old stays intact
	oldValid := x.valid
	if err := config.Apply(x.c, ops); err != nil {
		return nil, err
	}
	x.reindex()
	return func() {
		*x.c = old
		x.reindex()
		x.valid = oldValid
	}, nil
}

// reindex rebuilds every index from the configuration.
func (x *Config) reindex() {
	n := len(x.c.Domains)
	x.pos = make(map[string]int, n)
	x.names = make(map[string]int, n)
	x.byName = make(map[string]string, n)
	x.uuids = make(map[string]int, n)
	x.byUUID = make(map[string]string, n)
	x.qids = make(map[string]int, n)
	x.refs = make(map[string]int)
	x.labels = make(map[string]int)
	x.labelRefs = make(map[string]int)
	x.stale = false
	for i := range x.c.Domains {
		if _, dup := x.pos[x.c.Domains[i].ID]; !dup {
			x.pos[x.c.Domains[i].ID] = i // the first one, as config.Apply finds it
		}
		x.count(&x.c.Domains[i], 1)
	}
	x.countGlobals(x.c.Properties, 1)
	x.countLabels(x.c.Labels, 1)
	x.valid = x.c.CheckInvariants() == nil && len(x.pos) == n
}

// count adds (delta 1) or removes (-1) what domain d contributes to the indexes.
func (x *Config) count(d *config.Domain, delta int) {
	id := d.ID
	name := d.Name()
	x.lookup(x.names, x.byName, name, id, delta)
	if u, ok := d.Property("uuid"); ok && u != "" {
		x.lookup(x.uuids, x.byUUID, u, id, delta)
	}
	if q, ok := d.Property("qid"); ok {
		bump(x.qids, q, delta)
	}
	for _, p := range d.Properties {
		x.countRef(p, delta)
	}
}

// lookup keeps a count and a key → first id map in step.
func (x *Config) lookup(counts map[string]int, ids map[string]string, key, id string, delta int) {
	if delta > 0 {
		if counts[key] == 0 {
			ids[key] = id
		}
		bump(counts, key, delta)
		return
	}
	bump(counts, key, delta)
	if ids[key] == id {
		delete(ids, key)
		if counts[key] > 0 {
			x.stale = true // another domain has the key: find it when the batch ends
		}
	}
}

func (x *Config) countRef(p config.Property, delta int) {
	if qubeRefProps[p.Name] && p.Value != "" {
		bump(x.refs, p.Value, delta)
	}
	if p.Name == "label" {
		bump(x.labelRefs, p.Value, delta)
	}
}

// countGlobals counts global properties; default_pool* values name pools, not qubes,
// and config.CheckInvariants skips them.
func (x *Config) countGlobals(ps []config.Property, delta int) {
	for _, p := range ps {
		if !strings.HasPrefix(p.Name, "default_pool") {
			x.countRef(p, delta)
		}
	}
}

func (x *Config) countLabels(ls []config.Label, delta int) {
	for _, l := range ls {
		for _, k := range labelKeys(l) {
			bump(x.labels, k, delta)
		}
	}
}

// labelKeys are the two ways a "label" property may name a label.
func labelKeys(l config.Label) [2]string {
	return [2]string{l.Name, "label-" + strconv.Itoa(l.Index)}
}

func bump(m map[string]int, k string, delta int) {
	if n := m[k] + delta; n != 0 {
		m[k] = n
	} else {
		delete(m, k)
	}
}

// fixLookups refills byName and byUUID if a key that several domains share lost its
// entry (only uuids may be shared in a valid configuration). It runs once the domain
// list is final, never in the middle of a batch.
func (x *Config) fixLookups() {
	if !x.stale {
		return
	}
	clear(x.byName)
	clear(x.byUUID)
	for i := range x.c.Domains {
		d := &x.c.Domains[i]
		if n := d.Name(); x.byName[n] == "" {
			x.byName[n] = d.ID
		}
		if u, ok := d.Property("uuid"); ok && u != "" && x.byUUID[u] == "" {
			x.byUUID[u] = d.ID
		}
	}
	x.stale = false
}

// reposition refreshes the positions of the domains from index i on.
func (x *Config) reposition(i int) {
	for ; i < len(x.c.Domains); i++ {
		x.pos[x.c.Domains[i].ID] = i
	}
}

func (x *Config) checkRef(errs []error, owner string, p config.Property) []error {
	switch {
	case qubeRefProps[p.Name] && p.Value != "" && x.names[p.Value] == 0:
		errs = append(errs, fmt.Errorf("%w: %s.%s = %q", config.ErrDanglingRef, owner, p.Name, p.Value))
	case p.Name == "label" && x.labels[p.Value] == 0:
		errs = append(errs, fmt.Errorf("%w: %s.label = %q", config.ErrDanglingRef, owner, p.Value))
	}
	return errs
}
