package hvbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

// Timing of the client.
const (
	// waitRound bounds one WaitAgent request: a caller that vanishes without
	// cancelling holds the server's wait at most this long.
	waitRound = 30 * time.Second
	// replyGrace is how much longer than the server's budget a caller waits for the
	// reply that reports the budget ran out.
	replyGrace = 5 * time.Second
	// ackWait is how long a delivered notice stays with a watcher that neither acks
	// nor extends it (a dead one) before it goes to the next watcher.
	ackWait = 5 * time.Second
	// pullWait bounds one pull request of Watch; a cancelled watcher's last pull may
	// still take (and hand back) a notice this long.
	pullWait = 5 * time.Second
)

// Client is a hypervisor driver served by Serve on another process.
type Client struct {
	NC   *nats.Conn
	JS   jetstream.JetStream
	Host subject.Host
	// Consumer is the durable consumer Watch reads notices with; every lifecycle
	// instance of a host must use the same one. Default "vmlifecycle-<host>".
	Consumer string
	// Epoch is the caller's lease term (bus/lease); the hypervisor refuses changes
	// from a term older than one it has heard from (ErrFenced). Zero: no election.
	Epoch uint64
	// OnFenced, if set, runs when the hypervisor refuses a change as fenced: the
	// caller's term is over and it should step down.
	OnFenced func()

	waitRound time.Duration // tests shorten it; 0: waitRound
}

var _ vmlifecycle.Driver = Client{}

// Domains implements vmlifecycle.Driver.
func (c Client) Domains(ctx context.Context) ([]vmlifecycle.Domain, error) {
	var out []vmlifecycle.Domain
	if err := c.call(ctx, OpDomains, callArgs{}, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Domain implements vmlifecycle.Driver.
func (c Client) Domain(ctx context.Context, name string) (vmlifecycle.Domain, bool, error) {
	var rep domainReply
	if err := c.call(ctx, OpDomain, callArgs{Name: name}, &rep); err != nil {
		return vmlifecycle.Domain{}, false, err
	}
	return rep.Domain, rep.Found, nil
}

// ReserveMemory implements vmlifecycle.Driver.
func (c Client) ReserveMemory(ctx context.Context, name string, mib int) error {
	return c.call(ctx, OpReserveMemory, callArgs{Name: name, MiB: mib}, nil)
}

// ReleaseMemory implements vmlifecycle.Driver.
func (c Client) ReleaseMemory(ctx context.Context, name string) error {
	return c.call(ctx, OpReleaseMemory, callArgs{Name: name}, nil)
}

// Create implements vmlifecycle.Driver.
func (c Client) Create(ctx context.Context, spec vmlifecycle.DomainSpec) (vmlifecycle.Domain, error) {
	var d vmlifecycle.Domain
	if err := c.call(ctx, OpCreate, callArgs{Name: spec.Name, Spec: toWire(spec)}, &d); err != nil {
		return vmlifecycle.Domain{}, err
	}
	return d, nil
}

// Unpause implements vmlifecycle.Driver.
func (c Client) Unpause(ctx context.Context, name string) error {
	return c.call(ctx, OpUnpause, callArgs{Name: name}, nil)
}

// Pause implements vmlifecycle.Driver.
func (c Client) Pause(ctx context.Context, name string) error {
	return c.call(ctx, OpPause, callArgs{Name: name}, nil)
}

// Shutdown implements vmlifecycle.Driver.
func (c Client) Shutdown(ctx context.Context, name string) error {
	return c.call(ctx, OpShutdown, callArgs{Name: name}, nil)
}

// Destroy implements vmlifecycle.Driver.
func (c Client) Destroy(ctx context.Context, name string) error {
	return c.call(ctx, OpDestroy, callArgs{Name: name}, nil)
}

// Suspend implements vmlifecycle.Driver.
func (c Client) Suspend(ctx context.Context, name string) error {
	return c.call(ctx, OpSuspend, callArgs{Name: name}, nil)
}

// Wakeup implements vmlifecycle.Driver.
func (c Client) Wakeup(ctx context.Context, name string) error {
	return c.call(ctx, OpWakeup, callArgs{Name: name}, nil)
}

// Console implements vmlifecycle.Driver.
func (c Client) Console(ctx context.Context, name string) (string, error) {
	var path string
	err := c.call(ctx, OpConsole, callArgs{Name: name}, &path)
	return path, err
}

// WaitAgent implements vmlifecycle.Driver. It waits as long as ctx allows, in rounds
// of bounded requests, so the server never waits long for a caller that has vanished.
func (c Client) WaitAgent(ctx context.Context, name string, xid int) error {
	round := c.waitRound
	if round <= 0 {
		round = waitRound
	}
	for {
		budget := round
		if dl, ok := ctx.Deadline(); ok {
			budget = min(budget, time.Until(dl))
		}
		rctx, cancel := context.WithTimeout(ctx, budget+replyGrace)
		err := c.roundTrip(rctx, OpWaitAgent, budget, callArgs{Name: name, XID: xid}, nil)
		cancel()
		var herr *Error
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return fmt.Errorf("hypervisor %s %s: %w", OpWaitAgent, name, ctx.Err())
		case errors.As(err, &herr) && herr.Code == CodeTimeout:
			continue // the round ended, not the caller's patience
		default:
			return fmt.Errorf("hypervisor %s: %w", OpWaitAgent, err)
		}
	}
}

// call is one request with the caller's deadline, DefaultTimeout without one.
func (c Client) call(ctx context.Context, op string, args callArgs, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	dl, _ := ctx.Deadline()
	if err := c.roundTrip(ctx, op, time.Until(dl), args, out); err != nil {
		return fmt.Errorf("hypervisor %s: %w", op, err)
	}
	return nil
}

// roundTrip sends one request that the server gives budget to complete.
func (c Client) roundTrip(ctx context.Context, op string, budget time.Duration, args callArgs, out any) error {
	msg := nats.NewMsg(c.Host.Hypervisor(op))
	var err error
	if msg.Data, err = json.Marshal(args); err != nil {
		return err
	}
	id := nuid.Next()
	msg.Header.Set(headerCallID, id)
	msg.Header.Set(headerTimeout, strconv.FormatInt(max(budget.Milliseconds(), 0), 10))
	if c.Epoch != 0 {
		msg.Header.Set(headerEpoch, strconv.FormatUint(c.Epoch, 10))
	}
	rep, err := bus.Request(ctx, c.NC, msg, 0) // the hypervisor's connection may be moving node
	if err != nil {
		if ctx.Err() != nil {
			// Free the server from a call nobody waits for any more.
			_ = c.NC.Publish(c.Host.Hypervisor(OpCancel), []byte(id))
		}
		return err
	}
	if code := rep.Header.Get(micro.ErrorCodeHeader); code != "" {
		text := string(rep.Data)
		if text == "" {
			text = rep.Header.Get(micro.ErrorHeader)
		}
		if code == CodeFenced && c.OnFenced != nil {
			c.OnFenced()
		}
		return &Error{Code: code, Message: text}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(rep.Data, out); err != nil {
		return fmt.Errorf("decode reply: %w", err)
	}
	return nil
}

// Watch implements vmlifecycle.Driver with the host's durable consumer on NoticeStream:
// notices stored while nobody watched come first, in order, marked Backlog. The
// consumer starts with the notices after its creation: before the first watcher there
// was no lifecycle service to announce anything, and it reads the domains it finds. A notice is acked once
// the caller has received it from the channel; one the caller did not receive before
// ctx ended is handed back at once to the next watcher. Watchers sharing the consumer
// (two instances both believing they lead) split the notices between them.
func (c Client) Watch(ctx context.Context) (<-chan vmlifecycle.Notice, error) {
	name := c.Consumer
	if name == "" {
		name = string(rpc.VMLifecycle) + "-" + consumerToken(c.Host.ID())
	}
	if err := validConsumerName(name); err != nil {
		return nil, fmt.Errorf("watch hypervisor notices: %w", err)
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       name,
		Description:   "hypervisor notices for the vmlifecycle leader",
		FilterSubject: c.Host.HypervisorNotices(),
		DeliverPolicy: jetstream.DeliverNewPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       ackWait,
		// One at a time keeps the order across redeliveries.
		MaxAckPending: 1,
		MaxDeliver:    -1,
	}
	// Right after a NATS node is lost JetStream may take seconds to create consumers
	// again: a new lifecycle term keeps trying (short attempts) rather than failing,
	// which would hand the lease over and make the next holder wait as long.
	var cons jetstream.Consumer
	var info jetstream.Stream
	err := retryFor(ctx, watchSetupPatience, func(actx context.Context) error {
		var err error
		if cons, err = c.JS.CreateOrUpdateConsumer(actx, NoticeStream, cfg); err != nil {
			return fmt.Errorf("hypervisor notices consumer %s: %w", name, err)
		}
		// Notices stored up to now were reported before this watch began.
		if info, err = c.JS.Stream(actx, NoticeStream); err != nil {
			return fmt.Errorf("hypervisor notices stream: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	backlogUpTo := info.CachedInfo().State.LastSeq
	out := make(chan vmlifecycle.Notice)
	go func() {
		defer close(out)
		newBackoff := func() bus.Backoff { return bus.Backoff{Next: 100 * time.Millisecond, Max: 5 * time.Second} }
		backoff := newBackoff()
		for ctx.Err() == nil {
			msg, err := next(ctx, cons)
			switch {
			case err == nil:
				backoff = newBackoff()
			case ctx.Err() != nil:
				return
			case errors.Is(err, nats.ErrTimeout):
				continue // nothing to report this round
			default:
				// The consumer may have been deleted, or the connection is down: set it
				// up again once things may have settled.
				if backoff.Wait(ctx) != nil {
					return
				}
				if again, err := c.JS.CreateOrUpdateConsumer(ctx, NoticeStream, cfg); err == nil {
					cons = again
				}
				continue
			}
			var n vmlifecycle.Notice
			if err := json.Unmarshal(msg.Data(), &n); err != nil {
				_ = msg.Term() // not ours to understand; never deliver it again
				continue
			}
			if md, err := msg.Metadata(); err == nil && md.Sequence.Stream <= backlogUpTo {
				// Reported while another watcher (or none) was in charge: it may not
				// have been acted on.
				n.Backlog = true
			}
			if !deliver(ctx, out, n, msg) {
				return
			}
		}
	}()
	return out, nil
}

// next pulls one notice, waiting at most pullWait. The pull itself does not follow
// ctx: a notice already on its way to a watcher whose ctx ends is handed back for the
// next watcher at once, instead of being dropped and redelivered after the ack wait.
func next(ctx context.Context, cons jetstream.Consumer) (jetstream.Msg, error) {
	type pulled struct {
		msg jetstream.Msg
		err error
	}
	done := make(chan pulled, 1)
	go func() {
		msg, err := cons.Next(jetstream.FetchMaxWait(pullWait))
		done <- pulled{msg, err}
	}()
	select {
	case p := <-done:
		return p.msg, p.err
	case <-ctx.Done():
		go func() {
			if p := <-done; p.msg != nil {
				_ = p.msg.Nak()
			}
		}()
		return nil, ctx.Err()
	}
}

// deliver hands n to the watcher, keeping the message from being redelivered while
// the watcher is busy, and acks it once received. It reports false when ctx ended
// first; the message is then handed back to the stream for the next watcher.
func deliver(ctx context.Context, out chan<- vmlifecycle.Notice, n vmlifecycle.Notice, msg jetstream.Msg) bool {
	tick := time.NewTicker(ackWait / 3)
	defer tick.Stop()
	for {
		select {
		case out <- n:
			// A lost ack makes the notice come again, marked as replayed.
			_ = msg.Ack()
			return true
		case <-tick.C:
			_ = msg.InProgress()
		case <-ctx.Done():
			_ = msg.Nak()
			return false
		}
	}
}

// watchSetupPatience bounds how long Watch keeps trying to set up its consumer.
const watchSetupPatience = 30 * time.Second

// retryFor calls f, each attempt bounded to 2 s, until it succeeds, ctx ends or
// patience has passed; it returns f's last error.
func retryFor(ctx context.Context, patience time.Duration, f func(context.Context) error) error {
	deadline := time.Now().Add(patience)
	backoff := bus.Backoff{Next: 100 * time.Millisecond, Max: time.Second}
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := f(actx)
		cancel()
		if err == nil || ctx.Err() != nil || backoff.Passes(deadline) {
			return err
		}
		if werr := backoff.Wait(ctx); werr != nil {
			return err
		}
	}
}
