package replica

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/configstore"
)

// Follow returns a replica of the host's configuration that follows the change log
// until ctx ends. It starts from a snapshot, which names the log sequence it reflects,
// and reads the log from the next record on with an ordered consumer: the consumer
// resumes after the last record it delivered when NATS reconnects, so no change is
// lost, and a revision returned by Client.Apply is reached (WaitRevision).
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
	f := &follower{nc: nc, host: host, log: log, ctx: ctx, r: New(snap.Config, snap.Revision)}
	if _, err := clog.Tail(ctx, snap.Sequence+1, f.onRecord); err != nil {
		return nil, err
	}
	return f.r, nil
}

type follower struct {
	nc   *nats.Conn
	host subject.Host
	log  *slog.Logger
	ctx  context.Context
	r    *Replica
}

// onRecord runs on the consumer's goroutine, one record at a time, in log order.
func (f *follower) onRecord(rec changelog.Record, err error) {
	switch {
	case err != nil:
		f.log.Error("config change log", "err", err)
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

// resync replaces the replica with a fresh snapshot; later records it already
// reflects are then skipped by revision.
func (f *follower) resync() {
	snap, err := configstore.FetchSnapshot(f.ctx, f.nc, f.host)
	if err != nil {
		f.log.Error("resynchronise replica", "err", err)
		return
	}
	if snap.Revision > f.r.Revision() {
		f.r.Reset(snap.Config, snap.Revision)
	}
}
