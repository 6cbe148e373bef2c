package replica

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/configstore"
)

// Shared is given, the follower this process already runs for the host (the
// services of `qubesbus run` share one), or when given is nil a follower of its own.
func Shared(ctx context.Context, given *Replica, nc *nats.Conn, host subject.Host, log *slog.Logger) (*Replica, error) {
	if given != nil {
		return given, nil
	}
	return Follow(ctx, nc, host, log)
}

// Follow returns a replica of the host's configuration that follows the change log
// until ctx ends. It starts from a snapshot, which names the log sequence it reflects,
// and reads the log from the next record on with an ordered consumer: the consumer
// resumes after the last record it delivered when NATS reconnects, so no change is
// lost, and a revision returned by Client.Apply is reached (WaitRevision).
//
// The consumer alone can fall behind for long after a NATS node is lost: it starts
// over only once JetStream can create a consumer again, trying every 1, 2, 4, 8 then
// 10 s, each try waiting up to 10 s. A replica that a caller waits on (WaitRevision
// with a revision it lacks) therefore also reads the missing records itself, from the
// stream leader, which is back long before consumers can be created (catchUp).
func Follow(ctx context.Context, nc *nats.Conn, host subject.Host, log *slog.Logger) (*Replica, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	snap, err := configstore.FetchSnapshot(ctx, nc, host)
	if err != nil {
		return nil, err
	}
	clog, err := changelog.Attach(ctx, js, host)
	if err != nil {
		return nil, err
	}
	f := &follower{nc: nc, host: host, log: log, ctx: ctx, clog: clog, r: New(snap.Config, snap.Revision), seq: snap.Sequence}
	if _, err := clog.Tail(ctx, snap.Sequence+1, f.onRecord,
		changelog.Known(func(_, rev uint64) bool { return rev <= f.r.Revision() })); err != nil {
		return nil, err
	}
	go f.catchUp()
	return f.r, nil
}

type follower struct {
	nc   *nats.Conn
	host subject.Host
	log  *slog.Logger
	ctx  context.Context
	clog *changelog.Log
	r    *Replica

	// mu orders the consumer's records and catchUp's: seq is the stream sequence of
	// the last record either applied.
	mu  sync.Mutex
	seq uint64
}

// onRecord runs on the consumer's goroutine, one record at a time, in log order.
func (f *follower) onRecord(rec changelog.Record, err error) {
	if err != nil {
		f.log.Error("config change log", "err", err)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.apply(rec)
}

// apply applies a record unless catchUp (or the consumer) already did; f.mu is held.
func (f *follower) apply(rec changelog.Record) {
	if rec.Sequence != 0 && rec.Sequence <= f.seq {
		return
	}
	f.seq = max(f.seq, rec.Sequence)
	switch {
	case rec.Known:
		// The replica holds its revision already (Tail's Known).
	case rec.Base != nil:
		// A compaction's base, or the first record after a purge this replica was
		// behind: it replaces the state only if it is newer.
		if rec.Revision > f.r.Revision() {
			f.r.Reset(rec.Base, rec.Revision)
		}
	default:
		err := f.r.Apply(rec.Revision, rec.Change.Ops)
		if errors.Is(err, ErrGap) {
			f.log.Warn("config change log gap; resynchronising", "err", err)
			f.resync()
		} else if err != nil {
			f.log.Error("apply config change", "revision", rec.Revision, "err", err)
			f.resync()
		}
	}
}

// catchUpGrace is how long a waiting caller gives the consumer before the replica reads
// the log itself: long enough that a healthy consumer (sub-millisecond) always wins.
const catchUpGrace = 200 * time.Millisecond

// catchUp reads the records after the last applied one straight from the stream
// whenever a caller waits for a revision the consumer has not delivered in time.
func (f *follower) catchUp() {
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-f.r.lagging():
		}
		if bus.Sleep(f.ctx, catchUpGrace) != nil {
			return
		}
		if !f.r.hasWaiters() {
			continue // the consumer delivered meanwhile
		}
		backoff := bus.Backoff{Next: 50 * time.Millisecond, Max: time.Second}
		for f.r.hasWaiters() && f.ctx.Err() == nil {
			done, err := f.readNext()
			if done {
				break
			}
			if err != nil {
				f.log.Debug("catch up on the config change log", "err", err)
				if backoff.Wait(f.ctx) != nil {
					return
				}
			}
		}
	}
}

// readNext applies the record after the last applied one; done when there is none.
func (f *follower) readNext() (done bool, err error) {
	ctx, cancel := context.WithTimeout(f.ctx, 2*time.Second)
	defer cancel()
	f.mu.Lock()
	from := f.seq + 1
	f.mu.Unlock()
	rec, err := f.clog.Next(ctx, from)
	if errors.Is(err, changelog.ErrEnd) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.apply(rec)
	return false, nil
}

// resync replaces the replica with a fresh snapshot; later records it already
// reflects are then skipped by revision. f.mu is held.
func (f *follower) resync() {
	snap, err := configstore.FetchSnapshot(f.ctx, f.nc, f.host)
	if err != nil {
		f.log.Error("resynchronise replica", "err", err)
		return
	}
	if snap.Revision > f.r.Revision() {
		f.r.Reset(snap.Config, snap.Revision)
		f.seq = max(f.seq, snap.Sequence)
	}
}
