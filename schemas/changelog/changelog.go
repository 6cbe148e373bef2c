// Package changelog is the durable history of a host's configuration on JetStream: the
// QUBES_CONFIG stream, with one subject per host (subject.Host.Config).
//
// A record is either a change (one accepted mutation, taking the configuration to the
// next revision) or a base (the whole configuration at a revision: the first record of
// a host, and the point a compaction keeps). Kind and revision travel in the headers
// Qubes-Config-Kind and Qubes-Config-Revision. A change's body is JSON {revision, ops,
// changes_config}; a base's body is the configuration as gzip-compressed JSON, because
// 1000 qubes are about 1.5 MB of JSON and NATS' default max payload is 1 MB.
//
// Appends are conditional: each names the sequence of the last record of the host it
// has seen (the Nats-Expected-Last-Subject-Sequence header). When two writers saw the
// same last record only one append succeeds; the other gets ErrConflict, reads what it
// missed and decides again. So a host's records form one linear history however many
// persistence instances append to it.
package changelog

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// StreamName is the JetStream stream of every host's configuration history.
const StreamName = "QUBES_CONFIG"

// Headers of a record.
const (
	KindHeader     = "Qubes-Config-Kind"
	RevisionHeader = "Qubes-Config-Revision"
)

// Record kinds.
const (
	KindBase   = "base"
	KindChange = "change"
)

// StreamConfig are the settings of QUBES_CONFIG a deployment chooses.
type StreamConfig struct {
	// Replicas: 1 (default) on one server, 3 in a cluster. With 1 an acknowledged
	// record survives a killed process but, unless the server syncs every write, not
	// a power cut of the NATS host (see embedded.Config.SyncAlways).
	Replicas int
}

// Change is one accepted mutation.
type Change struct {
	Revision uint64      `json:"revision"`
	Ops      []config.Op `json:"ops"`
	// ChangesConfig is the mutation's flag: qubes.xml is to be written after it.
	ChangesConfig bool `json:"changes_config,omitempty"`
}

// Record is one entry of a host's history: exactly one of Base and Change is set.
type Record struct {
	Sequence uint64 // stream sequence; set by reads
	Revision uint64
	Base     *config.Config
	Change   *Change
	// Known: Tail did not read the body, because the follower's Known said it has
	// the record already (neither Base nor Change is set).
	Known bool
}

// TailOption changes how Tail delivers records.
type TailOption func(*tailOptions)

type tailOptions struct {
	known func(seq, rev uint64) bool
}

// Known makes Tail hand over a record as Known, its body unread, when known(sequence,
// revision) reports the follower has it already: a service whose own change its
// replica reflects before the log delivers it (properties, persistence) then pays
// nothing to decode it again.
func Known(known func(seq, rev uint64) bool) TailOption {
	return func(o *tailOptions) { o.known = known }
}

// Errors callers branch on.
var (
	// ErrConflict: another writer appended since the sequence the append named.
	ErrConflict = errors.New("config change log: another instance appended first")
	// ErrEnd: no record at or after the sequence asked for.
	ErrEnd = errors.New("config change log: no further record")
	// ErrCorrupt: a record that cannot be decoded.
	ErrCorrupt = errors.New("config change log: corrupt record")
)

// Log is the history of one host.
type Log struct {
	js      jetstream.JetStream
	stream  jetstream.Stream
	subject string
}

// Open returns a host's log, creating the stream if needed. An existing stream is used
// as it is: an instance started with other settings must not change them (say, drop
// the replicas of a cluster to 1).
func Open(ctx context.Context, js jetstream.JetStream, host subject.Host, c StreamConfig) (*Log, error) {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	var s jetstream.Stream
	err := bus.RetryJS(ctx, nil, "stream "+StreamName, func(ctx context.Context) error {
		var err error
		s, err = js.Stream(ctx, StreamName)
		if !errors.Is(err, jetstream.ErrStreamNotFound) {
			return err
		}
		s, err = js.CreateStream(ctx, jetstream.StreamConfig{
			Name:        StreamName,
			Description: "qubesbus configuration history: one subject per host, bases and changes",
			Subjects:    []string{subject.AllConfig()},
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			Retention:   jetstream.LimitsPolicy,
			// No limits: a record may go only through compaction (a purge behind a
			// base); if limits are ever added, refuse new records rather than drop
			// old ones silently.
			Discard:    jetstream.DiscardNew,
			DenyDelete: true,
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) { // created meanwhile
			s, err = js.Stream(ctx, StreamName)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("config stream %s: %w", StreamName, err)
	}
	return &Log{js: js, stream: s, subject: host.Config()}, nil
}

// Attach returns a host's log on a stream that must exist (for read-only followers).
func Attach(ctx context.Context, js jetstream.JetStream, host subject.Host) (*Log, error) {
	s, err := js.Stream(ctx, StreamName)
	if err != nil {
		return nil, fmt.Errorf("config stream %s: %w", StreamName, err)
	}
	return &Log{js: js, stream: s, subject: host.Config()}, nil
}

// Append stores r if the host's last record is still at sequence after (0: the host
// has none yet) and returns r's sequence once the stream has acknowledged it. On
// ErrConflict nothing was stored. On other errors (a timeout) the record may or may
// not be stored; the next append then tells.
func (l *Log) Append(ctx context.Context, after uint64, r Record) (uint64, error) {
	msg, err := l.encode(r)
	if err != nil {
		return 0, err
	}
	ack, err := l.js.PublishMsg(ctx, msg,
		jetstream.WithExpectStream(StreamName),
		// A retry after "no responders" is safe: the condition turns a second copy
		// into ErrConflict.
		jetstream.WithExpectLastSequencePerSubject(after))
	if err != nil {
		if isWrongLastSequence(err) {
			return 0, fmt.Errorf("%w: %w", ErrConflict, err)
		}
		return 0, fmt.Errorf("append config revision %d: %w", r.Revision, err)
	}
	return ack.Sequence, nil
}

func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// Last returns the sequence of the host's last record, 0 if it has none.
func (l *Log) Last(ctx context.Context) (uint64, error) {
	m, err := l.stream.GetLastMsgForSubject(ctx, l.subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("last config record: %w", err)
	}
	return m.Sequence, nil
}

// Next returns the host's first record at sequence from or later, or ErrEnd. It reads
// from the stream leader, so it sees every acknowledged record.
func (l *Log) Next(ctx context.Context, from uint64) (Record, error) {
	m, err := l.stream.GetMsg(ctx, max(from, 1), jetstream.WithGetMsgSubject(l.subject))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Record{}, ErrEnd
	}
	if err != nil {
		return Record{}, fmt.Errorf("read config record after %d: %w", from, err)
	}
	return Decode(m.Sequence, m.Header, m.Data)
}

// Holds reports whether the record at seq is the host's record of revision rev (it is
// not when the stream was purged or recreated since the sequence was noted).
func (l *Log) Holds(ctx context.Context, seq, rev uint64) (bool, error) {
	m, err := l.stream.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read config record %d: %w", seq, err)
	}
	return m.Subject == l.subject && m.Header.Get(RevisionHeader) == strconv.FormatUint(rev, 10), nil
}

// Compact removes the host's records before sequence keep, which must be a base.
func (l *Log) Compact(ctx context.Context, keep uint64) error {
	err := l.stream.Purge(ctx, jetstream.WithPurgeSubject(l.subject), jetstream.WithPurgeSequence(keep))
	if err != nil {
		return fmt.Errorf("compact config log before %d: %w", keep, err)
	}
	return nil
}

// Tail calls fn with every record of the host from sequence from on (0: from the first),
// in order, as they are appended, until stop is called or ctx ends. It rides an ordered
// consumer, which recreates itself after a reconnect or a missed message and resumes
// after the last record delivered, so nothing is skipped. fn runs on one goroutine.
func (l *Log) Tail(ctx context.Context, from uint64, fn func(Record, error), opts ...TailOption) (stop func(), err error) {
	var o tailOptions
	for _, opt := range opts {
		opt(&o)
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{l.subject}, DeliverPolicy: jetstream.DeliverAllPolicy}
	if from > 1 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = from
	}
	cons, err := l.js.OrderedConsumer(ctx, StreamName, cfg)
	if err != nil {
		return nil, fmt.Errorf("follow config log: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		meta, err := msg.Metadata()
		if err != nil {
			fn(Record{}, fmt.Errorf("%w: %w", ErrCorrupt, err))
			return
		}
		seq := meta.Sequence.Stream
		if o.known != nil {
			h := msg.Headers()
			rev, err := strconv.ParseUint(h.Get(RevisionHeader), 10, 64)
			if err == nil && (h.Get(KindHeader) == KindChange || h.Get(KindHeader) == KindBase) && o.known(seq, rev) {
				fn(Record{Sequence: seq, Revision: rev, Known: true}, nil)
				return
			}
		}
		fn(Decode(seq, msg.Headers(), msg.Data()))
	},
		// Short pulls with frequent heartbeats: after the server holding the consumer
		// dies, two missed heartbeats (2 s, not the default 30 s) make the ordered
		// consumer start over, so a replica (and every read waiting for it) catches up
		// soon after a node loss.
		jetstream.PullExpiry(5*time.Second), jetstream.PullHeartbeat(time.Second))
	if err != nil {
		return nil, fmt.Errorf("follow config log: %w", err)
	}
	stop = sync.OnceFunc(cc.Stop)
	context.AfterFunc(ctx, stop)
	return stop, nil
}

func (l *Log) encode(r Record) (*nats.Msg, error) {
	msg := nats.NewMsg(l.subject)
	msg.Header.Set(RevisionHeader, strconv.FormatUint(r.Revision, 10))
	switch {
	case r.Change != nil:
		msg.Header.Set(KindHeader, KindChange)
		b, err := json.Marshal(r.Change)
		if err != nil {
			return nil, fmt.Errorf("encode config change: %w", err)
		}
		msg.Data = b
	case r.Base != nil:
		msg.Header.Set(KindHeader, KindBase)
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		if err := json.NewEncoder(zw).Encode(r.Base); err != nil {
			return nil, fmt.Errorf("encode config base: %w", err)
		}
		if err := zw.Close(); err != nil {
			return nil, fmt.Errorf("encode config base: %w", err)
		}
		msg.Data = buf.Bytes()
	default:
		return nil, errors.New("config record without base or change")
	}
	return msg, nil
}

// Decode reads a record from a stream message.
func Decode(seq uint64, h nats.Header, data []byte) (Record, error) {
	rev, err := strconv.ParseUint(h.Get(RevisionHeader), 10, 64)
	if err != nil {
		return Record{}, fmt.Errorf("%w %d: revision: %w", ErrCorrupt, seq, err)
	}
	r := Record{Sequence: seq, Revision: rev}
	switch k := h.Get(KindHeader); k {
	case KindChange:
		r.Change = &Change{}
		if err := json.Unmarshal(data, r.Change); err != nil {
			return Record{}, fmt.Errorf("%w %d: %w", ErrCorrupt, seq, err)
		}
		if r.Change.Revision != rev {
			return Record{}, fmt.Errorf("%w %d: body revision %d, header %d", ErrCorrupt, seq, r.Change.Revision, rev)
		}
	case KindBase:
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return Record{}, fmt.Errorf("%w %d: %w", ErrCorrupt, seq, err)
		}
		r.Base = &config.Config{}
		if err := json.NewDecoder(zr).Decode(r.Base); err != nil {
			return Record{}, fmt.Errorf("%w %d: %w", ErrCorrupt, seq, err)
		}
		if _, err := io.Copy(io.Discard, zr); err != nil { // verifies the checksum
			return Record{}, fmt.Errorf("%w %d: %w", ErrCorrupt, seq, err)
		}
	default:
		return Record{}, fmt.Errorf("%w %d: kind %q", ErrCorrupt, seq, k)
	}
	return r, nil
}
