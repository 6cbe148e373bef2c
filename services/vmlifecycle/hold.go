package vmlifecycle

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
)

// Holds let another service keep a qube's lock while it changes the configuration the
// lifecycle depends on: the properties service removing a qube holds it, so that no
// Start can begin between its "is it halted?" check and the removal, as qubesd's single
// event loop guarantees. A hold ends on release, which carries the configuration
// revision of the change (the lock is kept until the replica has it, so the next
// operation sees the qube gone), or after its time-to-live if the holder died.

// maxHold bounds a hold whose holder never releases it.
const maxHold = lifecycle.MaxHold

type holds struct {
	mu sync.Mutex
	by map[string]func(rev uint64)
}

// The hold operation's messages.
type (
	HoldRequest    = lifecycle.HoldRequest
	HoldReply      = lifecycle.HoldReply
	ReleaseRequest = lifecycle.ReleaseRequest
)

// hold takes name's lock until release(rev) or ttl.
func (s *Service) hold(ctx context.Context, name string, ttl time.Duration) (string, error) {
	unlock, err := s.lock(ctx, name)
	if err != nil {
		return "", err
	}
	id := nuid.Next()
	var once sync.Once
	release := func(rev uint64) {
		once.Do(func() {
			if rev > 0 {
				wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				if err := s.model.WaitRevision(wctx, rev); err != nil {
					s.log.Warn("release hold: replica behind", "vm", name, "revision", rev, "err", err)
				}
				cancel()
			}
			s.held.mu.Lock()
			delete(s.held.by, id)
			s.held.mu.Unlock()
			unlock()
		})
	}
	s.held.mu.Lock()
	s.held.by[id] = release
	s.held.mu.Unlock()
	time.AfterFunc(min(max(ttl, time.Second), maxHold), func() { release(0) })
	return id, nil
}

func (s *Service) release(id string, rev uint64) bool {
	s.held.mu.Lock()
	f := s.held.by[id]
	s.held.mu.Unlock()
	if f == nil {
		return false
	}
	f(rev)
	return true
}

func (s *Service) serveHold(ctx context.Context) micro.HandlerFunc {
	return func(r micro.Request) {
		go func() {
			var req HoldRequest
			if err := json.Unmarshal(r.Data(), &req); err != nil || req.Name == "" {
				_ = r.RespondJSON(HoldReply{Error: "bad hold request"})
				return
			}
			hctx, cancel := context.WithTimeout(ctx, maxHold)
			defer cancel()
			id, err := s.hold(hctx, req.Name, time.Duration(req.TTLMS)*time.Millisecond)
			if err != nil {
				_ = r.RespondJSON(HoldReply{Error: err.Error()})
				return
			}
			_ = r.RespondJSON(HoldReply{ID: id, Mark: s.Mark().String()})
		}()
	}
}

func (s *Service) serveRelease(r micro.Request) {
	var req ReleaseRequest
	if err := json.Unmarshal(r.Data(), &req); err != nil {
		_ = r.RespondJSON(HoldReply{Error: "bad release request"})
		return
	}
	go func() {
		if !s.release(req.ID, req.Revision) {
			_ = r.RespondJSON(HoldReply{Error: "no such hold"})
			return
		}
		_ = r.RespondJSON(HoldReply{ID: req.ID})
	}()
}
