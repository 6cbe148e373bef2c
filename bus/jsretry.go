package bus

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// JetStream API error codes that a cluster answers while it forms or elects a leader;
// the same call succeeds a moment later.
const (
	jsClusterNoPeers   = 10005 // no suitable peers for placement (peers not yet known)
	jsClusterNotAvail  = 10008 // JetStream system temporarily unavailable
	jsClusterNotLeader = 10009 // not the leader (an election under way)
)

// TransientJS reports whether err from a JetStream API call (stream or bucket
// creation, lookup) is one a forming or recovering cluster gives: no answer in time,
// no responders, or the cluster's own "try again" codes. A caller whose ctx has ended
// is never told to retry.
func TransientJS(ctx context.Context, err error) bool {
	if err == nil || ctx.Err() != nil {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) {
		return true
	}
	var api *jetstream.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode {
		case jsClusterNoPeers, jsClusterNotAvail, jsClusterNotLeader:
			return true
		}
	}
	return false
}

// RetryJS runs op until it succeeds, fails for good, or ctx ends. Start-up calls to
// JetStream's API (creating the streams and buckets a service needs) go through it:
// in a cluster that is still electing its meta leader, or under load, one attempt can
// time out although the next succeeds, and a service must not exit for that.
func RetryJS(ctx context.Context, log *slog.Logger, what string, op func(context.Context) error) error {
	if log == nil {
		log = slog.Default()
	}
	b := Backoff{Next: 100 * time.Millisecond, Max: 2 * time.Second}
	for {
		err := op(ctx)
		if !TransientJS(ctx, err) {
			return err
		}
		log.Warn("jetstream not ready; retrying", "what", what, "err", err, "in", b.Next)
		if werr := b.Wait(ctx); werr != nil {
			return errors.Join(err, werr)
		}
	}
}

// RetryJSFor is RetryJS for an operation that returns what it made (a stream, a
// bucket, a consumer).
func RetryJSFor[T any](ctx context.Context, log *slog.Logger, what string, op func(context.Context) (T, error)) (T, error) {
	var v T
	err := RetryJS(ctx, log, what, func(ctx context.Context) error {
		var err error
		v, err = op(ctx)
		return err
	})
	return v, err
}

// OpenKV binds the bucket cfg names, creating it with cfg when it does not exist yet
// (an existing bucket keeps the settings an operator gave it), retried as RetryJS.
func OpenKV(ctx context.Context, js jetstream.JetStream, log *slog.Logger, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	return RetryJSFor(ctx, log, "bucket "+cfg.Bucket, func(ctx context.Context) (jetstream.KeyValue, error) {
		if kv, err := js.KeyValue(ctx, cfg.Bucket); err == nil {
			return kv, nil
		}
		return js.CreateOrUpdateKeyValue(ctx, cfg)
	})
}
