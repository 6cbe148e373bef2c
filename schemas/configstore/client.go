package configstore

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// ApplyReply answers store.apply.
type ApplyReply struct {
	Revision uint64 `json:"revision,omitempty"`
	Error    string `json:"error,omitempty"`
	Code     string `json:"code,omitempty"` // one of the Code constants
	// Kind says which config error refused an invalid mutation (a code of invalidKinds),
	// so callers can still match config's sentinels with errors.Is.
	Kind string `json:"kind,omitempty"`
}

// Codes of a failed store.apply.
const (
	CodeStale       = "stale"       // config.ErrStaleRevision
	CodeInvalid     = "invalid"     // the mutation breaks the configuration
	CodeUnavailable = "unavailable" // ErrUnavailable, ErrNotServing: try again
	CodeNotSaved    = "not-saved"   // ErrNotSaved: accepted, qubes.xml not written
	CodeForbidden   = "forbidden"   // ErrNotPermitted: an op the caller may not apply
)

// KindBadOp is the Kind of a mutation that could not even be decoded.
const KindBadOp = "bad-op"

// invalidKinds maps config's errors to ApplyReply.Kind and back, in matching order.
var invalidKinds = qerr.Codes{
	{Code: "no-such-domain", Err: config.ErrNoSuchDomain},
	{Code: "duplicate", Err: config.ErrDuplicate},
	{Code: "dangling-ref", Err: config.ErrDanglingRef},
	{Code: KindBadOp, Err: config.ErrBadOp},
}

// ReplyFor is the ApplyReply of an Apply that returned rev and err.
func ReplyFor(rev uint64, err error) ApplyReply {
	switch {
	case err == nil:
		return ApplyReply{Revision: rev}
	case errors.Is(err, config.ErrStaleRevision):
		return ApplyReply{Error: err.Error(), Code: CodeStale}
	case errors.Is(err, ErrNotPermitted):
		return ApplyReply{Error: err.Error(), Code: CodeForbidden}
	case errors.Is(err, ErrNotSaved):
		return ApplyReply{Revision: rev, Error: err.Error(), Code: CodeNotSaved}
	case errors.Is(err, ErrUnavailable), errors.Is(err, ErrNotServing),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return ApplyReply{Error: err.Error(), Code: CodeUnavailable}
	}
	return ApplyReply{Error: err.Error(), Code: CodeInvalid, Kind: invalidKinds.Code(err)}
}

// Client is the other services' handle on a host's persistence service.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
	// Caller names who applies: the service's rpc.Service name, or Operator. Its
	// mutations go to ApplySubject(Host, Caller), and persistence applies only what
	// Permits lets it.
	Caller string
	// Local, if set, is an instance of the host's store in this process, which
	// Apply reaches without NATS while it serves.
	Local Local
}

// Local is a store instance serving in this process (persistence.Store). When the
// services and persistence share a process (`qubesbus run`, the lab), a change's
// apply is two NATS hops (request and reply, each through the server's goroutines)
// that took about 200 of a change's 350 µs under the write lock of properties; the
// change log's append, which every replica follows, still goes through JetStream.
type Local interface {
	// ApplyLocal answers m as the instance's apply endpoint would; ok is false when
	// the instance does not serve (the client then sends m over NATS, to whichever
	// instance serves). It must not keep or change m.
	// caller is Client.Caller, held to Permits as over NATS.
	ApplyLocal(ctx context.Context, caller string, m config.Mutation) (rep ApplyReply, ok bool)
}

// shareable: m's ops hold no pointers, so an instance in this process can take them
// as they are (over NATS they are copied by encoding). Ops that carry a whole qube,
// label or pool go over NATS.
func shareable(m config.Mutation) bool {
	for _, op := range m.Ops {
		if op.New != nil || op.Label != nil || op.Pool != nil {
			return false
		}
	}
	return true
}

// While no persistence instance listens, requests are sent again for up to
// noResponderPatience (bus.Request).
const noResponderPatience = 10 * time.Second

// Apply sends a mutation and returns its revision. Errors: ErrRejected (wrapping
// config.ErrStaleRevision or the config error that refused it), ErrUnavailable, and
// ErrNotSaved with the revision of the accepted change. A mutation with an op the
// caller may not apply is rejected whole (ErrRejected wrapping ErrNotPermitted).
func (c Client) Apply(ctx context.Context, m config.Mutation) (uint64, error) {
	if c.Caller == "" {
		return 0, errors.New("apply mutation: the client names no caller")
	}
	if c.Local != nil && shareable(m) {
		if rep, ok := c.Local.ApplyLocal(ctx, c.Caller, m); ok {
			return rep.result()
		}
	}
	b, err := json.Marshal(m)
	if err != nil {
		return 0, err
	}
	msg, err := request(ctx, c.NC, ApplySubject(c.Host, c.Caller), b)
	if err != nil {
		return 0, fmt.Errorf("apply mutation: %w", err)
	}
	var rep ApplyReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return 0, fmt.Errorf("decode apply reply: %w", err)
	}
	return rep.result()
}

// result is the revision and error an apply reply stands for.
func (rep ApplyReply) result() (uint64, error) {
	switch rep.Code {
	case "":
		if rep.Error != "" {
			return 0, fmt.Errorf("%w: %s", ErrRejected, rep.Error)
		}
		return rep.Revision, nil
	case CodeStale:
		return 0, fmt.Errorf("%w: %w: %s", ErrRejected, config.ErrStaleRevision, rep.Error)
	case CodeNotSaved:
		return rep.Revision, fmt.Errorf("%w: %s", ErrNotSaved, rep.Error)
	case CodeForbidden:
		return 0, fmt.Errorf("%w: %w: %s", ErrRejected, ErrNotPermitted, rep.Error)
	case CodeUnavailable:
		return 0, fmt.Errorf("%w: %s", ErrUnavailable, rep.Error)
	}
	if kind := invalidKinds.Err(rep.Kind); kind != nil {
		return 0, fmt.Errorf("%w: %w: %s", ErrRejected, kind, rep.Error)
	}
	return 0, fmt.Errorf("%w: %s", ErrRejected, rep.Error)
}

// Flush returns once qubes.xml holds revision rev or later; concurrent flushes share
// one write.
func (c Client) Flush(ctx context.Context, rev uint64) error {
	b, _ := json.Marshal(FlushRequest{Revision: rev})
	msg, err := request(ctx, c.NC, c.Host.Store(OpFlush), b)
	if err != nil {
		return fmt.Errorf("flush qubes.xml: %w", err)
	}
	var rep ApplyReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("decode flush reply: %w", err)
	}
	if rep.Error != "" {
		return fmt.Errorf("%w: %s", ErrNotSaved, rep.Error)
	}
	return nil
}

// Sync returns once every change up to revision rev is durable in the change log (it
// survives a power cut as far as the deployment's NATS storage allows): the second
// half of an Apply with config.Mutation.DeferSync. Concurrent syncs share one.
func (c Client) Sync(ctx context.Context, rev uint64) error {
	b, _ := json.Marshal(SyncRequest{Revision: rev})
	msg, err := request(ctx, c.NC, c.Host.Store(OpSync), b)
	if err != nil {
		return fmt.Errorf("sync change log: %w", err)
	}
	var rep ApplyReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("decode sync reply: %w", err)
	}
	if rep.Error != "" {
		return fmt.Errorf("%w: %s", ErrNotSaved, rep.Error)
	}
	return nil
}

// Snapshot fetches the whole configuration.
func (c Client) Snapshot(ctx context.Context) (Snapshot, error) {
	return FetchSnapshot(ctx, c.NC, c.Host)
}

// Metrics fetches the counters of whichever instance answers.
func (c Client) Metrics(ctx context.Context) (Metrics, error) {
	msg, err := request(ctx, c.NC, c.Host.Store(OpMetrics), nil)
	if err != nil {
		return Metrics{}, fmt.Errorf("fetch persistence metrics: %w", err)
	}
	var m Metrics
	if err := json.Unmarshal(msg.Data, &m); err != nil {
		return Metrics{}, fmt.Errorf("decode persistence metrics: %w", err)
	}
	return m, nil
}

// FetchSnapshot asks the persistence service of a host for its configuration.
func FetchSnapshot(ctx context.Context, nc *nats.Conn, host subject.Host) (Snapshot, error) {
	msg, err := request(ctx, nc, host.Store(OpSnapshot), nil)
	if err != nil {
		return Snapshot{}, fmt.Errorf("fetch config snapshot: %w", err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return Snapshot{}, fmt.Errorf("fetch config snapshot: %s %s", code, msg.Header.Get(micro.ErrorHeader))
	}
	var snap Snapshot
	var body io.Reader = bytes.NewReader(msg.Data)
	if msg.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			return Snapshot{}, fmt.Errorf("decode config snapshot: %w", err)
		}
		body = zr
	}
	if err := json.NewDecoder(body).Decode(&snap); err != nil {
		return Snapshot{}, fmt.Errorf("decode config snapshot: %w", err)
	}
	return snap, nil
}

// request asks again while no instance listens, for up to noResponderPatience (an
// instance restarting, a standby taking over): nobody received the request then, so
// repeating it cannot apply a mutation twice.
func request(ctx context.Context, nc *nats.Conn, subj string, data []byte) (*nats.Msg, error) {
	return bus.Request(ctx, nc, &nats.Msg{Subject: subj, Data: data}, noResponderPatience)
}
