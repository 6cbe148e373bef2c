package vmlifecycle

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus/envelope"
)

// Holds let another service keep a qube's lock while it changes the configuration the
// lifecycle depends on: the properties service removing a qube holds it, so that no
// Start can begin between its "is it halted?" check and the removal, as qubesd's single
// event loop guarantees. A hold ends on release, which carries the configuration
// revision of the change (the lock is kept until the replica has it, so the next
// operation sees the qube gone), or after its time-to-live if the holder died.

// maxHold bounds a hold whose holder never releases it.
const maxHold = 30 * time.Second

type holds struct {
	mu sync.Mutex
	by map[string]func(rev uint64)
}

// HoldRequest asks for a qube's lock.
type HoldRequest struct {
	Name  string `json:"name"`
	TTLMS int64  `json:"ttl_ms,omitempty"`
}

// HoldReply grants it: Mark is the runtime mark once the lock was taken, so that a
// runtime query after the hold reflects the qube's settled state.
type HoldReply struct {
	ID    string `json:"id,omitempty"`
	Mark  string `json:"mark,omitempty"`
	Error string `json:"error,omitempty"`
}

// ReleaseRequest ends a hold once the replica has reached Revision.
type ReleaseRequest struct {
	ID       string `json:"id"`
	Revision uint64 `json:"revision,omitempty"`
}

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

// Hold implements the properties service's QubeHolder: it keeps name's lock in the
// lifecycle service until release is called with the configuration revision of the
// change made meanwhile. after is the runtime mark once the lock was held.
func (c StatesClient) Hold(ctx context.Context, name string) (after envelope.RuntimeMark, release func(rev uint64), err error) {
	var rep HoldReply
	if err := c.call(ctx, "hold", HoldRequest{Name: name, TTLMS: maxHold.Milliseconds()}, &rep); err != nil {
		return after, nil, fmt.Errorf("hold %s in vmlifecycle: %w", name, err)
	}
	if after, err = envelope.ParseRuntimeMark(rep.Mark); err != nil {
		return after, nil, err
	}
	release = func(rev uint64) {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		var out HoldReply
		_ = c.call(rctx, "release", ReleaseRequest{ID: rep.ID, Revision: rev}, &out)
	}
	return after, release, nil
}

// call makes one JSON request to an internal endpoint of the lifecycle service.
func (c StatesClient) call(ctx context.Context, op string, req any, out *HoldReply) error {
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.request(ctx, op, data, out); err != nil {
		return err
	}
	if out.Error != "" {
		return fmt.Errorf("%s", out.Error)
	}
	return nil
}
