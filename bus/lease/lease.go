// Package lease elects one holder of a role among several instances, with a key in a
// JetStream key-value bucket whose values expire: the lifecycle service of a host
// must be one instance at a time (it alone drives the hypervisor and announces its
// notices), while standby instances wait to take over.
//
// The holder creates the key and renews it by revision-checked updates; a holder that
// dies stops renewing and the key expires after the bucket's TTL, when a standby's
// create succeeds. A holder that cannot renew steps down before the TTL has passed
// since its last renewal, so two holders never both believe they hold the lease
// (short of a pause longer than that margin). The revision that created a term
// orders terms: it is the term's fencing token and epoch.
package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
)

// Bucket is the key-value bucket of every lease.
const Bucket = "QUBES_LEASES"

// DefaultTTL is how long a lease outlives its holder's last renewal. It is longer
// than a JetStream stream leader election after a node loss, so that a holder does
// not lose its lease to every node failure.
const DefaultTTL = 5 * time.Second

// ErrLost reports that a term ended because the lease was lost or expired.
var ErrLost = errors.New("lease lost")

// Open creates the lease bucket, or binds to it if it exists (a service whose NATS
// user may not create buckets binds to the one an operator created). Every lease in
// it expires ttl after its last renewal.
func Open(ctx context.Context, js jetstream.JetStream, ttl time.Duration, replicas int) (jetstream.KeyValue, error) {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	kv, err := bus.RetryJSFor(ctx, nil, "bucket "+Bucket, func(ctx context.Context) (jetstream.KeyValue, error) {
		kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: Bucket, Description: "qubesbus leases: one holder per role",
			TTL: ttl, History: 1, Storage: jetstream.FileStorage, Replicas: max(replicas, 1),
		})
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return js.KeyValue(ctx, Bucket)
		}
		return kv, err
	})
	if err != nil {
		return nil, fmt.Errorf("lease bucket: %w", err)
	}
	return kv, nil
}

// Lease is one instance's claim on a role.
type Lease struct {
	kv     jetstream.KeyValue
	key    string
	holder string
	ttl    time.Duration
	log    *slog.Logger
}

// New returns the claim of holder (a name for logs and operators) on key. ttl must be
// the bucket's.
func New(kv jetstream.KeyValue, key, holder string, ttl time.Duration, log *slog.Logger) *Lease {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Lease{kv: kv, key: key, holder: holder, ttl: ttl, log: log}
}

// Term is one tenure of a lease.
type Term struct {
	// Epoch is the revision that created the term: a later term has a larger one.
	Epoch uint64
	ctx   context.Context
	stop  context.CancelCauseFunc
	done  chan struct{}
	l     *Lease
	rev   uint64 // last renewal; owned by the renewing goroutine until done
}

// Context ends when the term does (lost, expired, released or the parent ended).
func (t *Term) Context() context.Context { return t.ctx }

// Release ends the term and gives the lease up at once, so a standby need not wait
// for it to expire.
func (t *Term) Release(ctx context.Context) error {
	t.stop(nil)
	<-t.done
	err := t.l.kv.Delete(ctx, t.l.key, jetstream.LastRevision(t.rev))
	if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) && !isMismatch(err) {
		return fmt.Errorf("release lease %s: %w", t.l.key, err)
	}
	return nil
}

// Acquire waits until this instance holds the lease, and keeps renewing it until the
// term ends. It returns ctx's error if ctx ends first.
func (l *Lease) Acquire(ctx context.Context) (*Term, error) {
	for {
		rev, err := l.kv.Create(ctx, l.key, []byte(l.holder))
		if err == nil {
			l.log.Info("lease acquired", "key", l.key, "holder", l.holder, "epoch", rev)
			return l.begin(ctx, rev), nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !isMismatch(err) {
			l.log.Warn("lease: create", "key", l.key, "err", err)
		}
		// Held by another instance (or NATS is away): try again a few times per TTL,
		// jittered so standbys do not ask in lock step.
		if err := bus.Sleep(ctx, l.ttl/4+rand.N(l.ttl/8+1)); err != nil {
			return nil, err
		}
	}
}

func (l *Lease) begin(parent context.Context, rev uint64) *Term {
	ctx, stop := context.WithCancelCause(parent)
	t := &Term{Epoch: rev, ctx: ctx, stop: stop, done: make(chan struct{}), l: l, rev: rev}
	go t.renew()
	return t
}

// renew updates the key a few times per TTL. It ends the term when another holder has
// the key, or when no renewal has succeeded for twice the TTL. While the bucket is
// unreachable (a stream leader election after a node loss) nobody can take the lease
// over; once it is back, a key that expired meanwhile shows as a conflict.
func (t *Term) renew() {
	defer close(t.done)
	l := t.l
	last := time.Now()
	tick := time.NewTicker(l.ttl / 4)
	defer tick.Stop()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
		}
		if time.Since(last) > 2*l.ttl {
			l.log.Error("lease expired: no renewal succeeded in time", "key", l.key, "epoch", t.Epoch)
			t.stop(ErrLost)
			return
		}
		rctx, cancel := context.WithTimeout(t.ctx, l.ttl/4)
		rev, err := l.kv.Update(rctx, l.key, []byte(l.holder), t.rev)
		cancel()
		switch {
		case err == nil:
			t.rev, last = rev, time.Now()
		case isMismatch(err):
			// A renewal whose acknowledgement did not arrive in time (a loaded server)
			// may still have been stored: then the key is newer than t.rev but still
			// ours, and the term goes on from that revision.
			if rev, ours := t.stillOurs(); ours {
				l.log.Info("lease renewal stored after its timeout; term goes on", "key", l.key, "epoch", t.Epoch)
				t.rev, last = rev, time.Now()
				continue
			}
			l.log.Error("lease lost to another holder", "key", l.key, "epoch", t.Epoch, "err", err)
			t.stop(ErrLost)
			return
		case errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted):
			l.log.Error("lease lost to another holder", "key", l.key, "epoch", t.Epoch, "err", err)
			t.stop(ErrLost)
			return
		default:
			l.log.Warn("lease: renew", "key", l.key, "err", err)
		}
	}
}

// stillOurs reads the key after a renewal conflicted: it is still this term's when its
// latest value is this holder's and its revision is past the last renewal known (no
// other holder can have written in between: one would have had to create the key
// after it expired, with its own name).
func (t *Term) stillOurs() (uint64, bool) {
	ctx, cancel := context.WithTimeout(t.ctx, t.l.ttl/4)
	defer cancel()
	e, err := t.l.kv.Get(ctx, t.l.key)
	if err != nil {
		return 0, false
	}
	return e.Revision(), string(e.Value()) == t.l.holder && e.Revision() > t.rev
}

// isMismatch reports a revision conflict; replicated buckets report it with another
// code than single-node ones.
func isMismatch(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) ||
		(errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant))
}
