package properties

import "sync"

// maxCachedReplies bounds a replyCache (about 3 KiB each: 48 MiB at most).
const maxCachedReplies = 16384

// replyCache keeps the replies of the reads qvm-ls makes of every qube (GetAll of
// each, the list). Such a reply is a function of the configuration revision and the
// runtime snapshot (runtimeCache's number) it was computed from, and of the call, so
// it is served again for as long as both stay the same; either changing empties the
// cache. Callers must not modify a reply they get or put.
type replyCache struct {
	mu       sync.Mutex
	rev, gen uint64
	replies  map[replyKey][]byte
	// misses counts the GetAll replies computed at (rev, gen), and ahead says a
	// read-ahead of the others started (missed).
	misses int
	ahead  bool
}

type replyKey struct{ method, dest string }

// get returns the reply kept for k at revision rev and snapshot gen.
func (c *replyCache) get(rev, gen uint64, k replyKey) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rev != rev || c.gen != gen {
		return nil, false
	}
	b, ok := c.replies[k]
	return b, ok
}

// put keeps the reply to k computed at revision rev from snapshot gen (0: values
// that were not kept, so nothing is). A newer revision or snapshot replaces the
// cache's contents; an older one is not kept.
func (c *replyCache) put(rev, gen uint64, k replyKey, b []byte) {
	if gen == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case rev < c.rev || (rev == c.rev && gen < c.gen):
		return
	case rev != c.rev || gen != c.gen || c.replies == nil:
		c.renew(rev, gen)
	}
	if len(c.replies) < maxCachedReplies {
		c.replies[k] = b
	}
}

func (c *replyCache) renew(rev, gen uint64) {
	c.rev, c.gen, c.replies, c.misses, c.ahead = rev, gen, make(map[replyKey][]byte), 0, false
}

// readAheadAfter is the number of GetAll replies a client must miss at one revision
// and snapshot before the others are computed ahead of it (Service.readAhead): qvm-ls
// asks every qube's in turn, while qvm-prefs and most tools ask one.
const readAheadAfter = 3

// missed counts a GetAll reply that was not kept at (rev, gen), and reports whether
// the others should now be read ahead: once per revision and snapshot.
func (c *replyCache) missed(rev, gen uint64) bool {
	if gen == 0 {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case rev < c.rev || (rev == c.rev && gen < c.gen):
		return false
	case rev != c.rev || gen != c.gen || c.replies == nil:
		c.renew(rev, gen)
	}
	c.misses++
	if c.ahead || c.misses < readAheadAfter {
		return false
	}
	c.ahead = true
	return true
}

// current reports whether the cache still keeps the replies of (rev, gen).
func (c *replyCache) current(rev, gen uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev == rev && c.gen == gen
}
