package persistence

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/persistence/replica"
)

// Follow returns a replica of the host's configuration that follows the change feed
// until ctx ends. It subscribes before it fetches the snapshot, so no change between
// the two is missed; on a gap it fetches a new snapshot.
func Follow(ctx context.Context, nc *nats.Conn, host subject.Host, log *slog.Logger) (*replica.Replica, error) {
	changes := make(chan *nats.Msg, 1024)
	sub, err := nc.ChanSubscribe(host.Config(), changes)
	if err != nil {
		return nil, fmt.Errorf("subscribe config changes: %w", err)
	}
	snap, err := FetchSnapshot(ctx, nc, host)
	if err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	r := replica.New(snap.Config, snap.Revision)
	go func() {
		defer sub.Unsubscribe()
		for {
			select {
			case <-ctx.Done():
				return
			case msg := <-changes:
				var ch Change
				if err := json.Unmarshal(msg.Data, &ch); err != nil {
					log.Error("bad config change", "err", err)
					continue
				}
				err := r.Apply(ch.Revision, ch.Ops)
				if errors.Is(err, replica.ErrGap) {
					log.Warn("config change feed gap; resynchronising", "err", err)
					snap, serr := FetchSnapshot(ctx, nc, host)
					if serr != nil {
						log.Error("resynchronise replica", "err", serr)
						continue
					}
					r.Reset(snap.Config, snap.Revision)
				} else if err != nil {
					log.Error("apply config change", "revision", ch.Revision, "err", err)
				}
			}
		}
	}()
	return r, nil
}
