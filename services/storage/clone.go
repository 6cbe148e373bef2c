package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
)

// TokenBucket holds the pending clone tokens of every host (key <host>.<token>), so
// that CloneTo works on whichever instance serves it; entries expire after the TTL.
const TokenBucket = "QUBES_CLONE_TOKENS"

func openTokens(ctx context.Context, js jetstream.JetStream, replicas int, ttl time.Duration) (jetstream.KeyValue, error) {
	if replicas == 0 {
		replicas = 1
	}
	kv, err := bus.OpenKV(ctx, js, nil, jetstream.KeyValueConfig{Bucket: TokenBucket, TTL: ttl,
		Replicas: replicas, Storage: jetstream.FileStorage, History: 1})
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", TokenBucket, err)
	}
	return kv, nil
}

// pendingClone is what a token stands for: a volume, by its pool and vid (as qubesd
// keeps the volume object), and the qube it was taken from.
type pendingClone struct {
	Qube string `json:"qube"`
	Name string `json:"name"`
	Pool string `json:"pool"`
	VID  string `json:"vid"`
}

func (s *Service) tokenKey(token string) string { return s.cfg.Host.ID() + "." + token }

// validToken reports whether an untrusted token can be a key at all (tokens are
// letters and digits).
func validToken(t string) bool {
	return t != "" && len(t) <= 64 && allIn(t, letters+digits)
}

func (s *Service) volumeCloneFrom(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	_, v, err := q.volume(c)
	if err != nil {
		return nil, err
	}
	token := s.cfg.NewToken()
	data, _ := json.Marshal(pendingClone{Qube: c.Dest.Name, Name: v.Name, Pool: v.Pool, VID: v.VID})
	if !validToken(token) {
		return nil, qerr.Abort("bad token generator")
	}
	if _, err := s.tokens.Create(ctx, s.tokenKey(token), data); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, qerr.QubesException(fmt.Sprintf("Clone of %s volume of %s already in progress", v.Name, c.Dest.Name))
		}
		return nil, fmt.Errorf("%w: store clone token: %w", qerr.ErrAbort, err)
	}
	return []byte(token), nil
}

// takeToken returns and deletes a pending clone: a token is used once, by whichever
// caller deletes it first.
func (s *Service) takeToken(ctx context.Context, token string) (pendingClone, bool, error) {
	var pc pendingClone
	if !validToken(token) {
		return pc, false, nil
	}
	e, err := s.tokens.Get(ctx, s.tokenKey(token))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return pc, false, nil
	}
	if err != nil {
		return pc, false, err
	}
	if err := s.tokens.Delete(ctx, s.tokenKey(token), jetstream.LastRevision(e.Revision())); err != nil {
		if casConflict(err) { // replicated buckets answer 10164, not 10071
			return pc, false, nil // used meanwhile
		}
		return pc, false, err
	}
	if err := json.Unmarshal(e.Value(), &pc); err != nil {
		return pc, false, err
	}
	return pc, true, nil
}

func (s *Service) volumeCloneTo(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	if _, _, err := q.volume(c); err != nil {
		return nil, err
	}
	if !isASCII(c.Payload) {
		return nil, qerr.ProtocolError("Token contains non-ASCII characters")
	}
	token := strings.TrimSpace(string(c.Payload))
	return s.volumeWrite(ctx, c, func(q qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		pc, ok, err := s.takeToken(ctx, token)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: clone token: %w", qerr.ErrAbort, err)
		}
		if !ok {
			return nil, nil, qerr.VolumeCopyTokenNotFoundError("Token to clone volume of qube was not found")
		}
		// The source must still exist (the token is spent anyway).
		var src *Source
		if sv, ok := s.findVolume(pc.Pool, pc.VID); ok {
			sp, err := s.poolOf(q.pools, sv)
			if err != nil {
				return nil, nil, err
			}
			src = &Source{Volume: effective(sp, sv), Pool: sp}
		}
		if src == nil {
			return nil, nil, qerr.Abort("clone source " + pc.Pool + ":" + pc.VID + " is gone")
		}
		if err := p.Import(ctx, effective(p, v), src); err != nil {
			return nil, nil, err
		}
		if size := p.Size(v); size != v.Size && v.Size != 0 {
			v.Size = size
		}
		return &v, []cloudevent.Event{cloudevent.New(c.Dest.Name, "domain-import-volume", "name", v.Name, "source", src.Volume.VID)}, nil
	})
}
