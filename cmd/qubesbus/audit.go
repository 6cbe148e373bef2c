package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// auditOptions select the records `qubesbus audit` prints.
type auditOptions struct {
	streamClient
	Host  string // "*" for every host
	Since string // stream sequence, RFC 3339 time, or a duration ago ("10m"); empty: new only
	JSON  bool
	Limit int // stop after this many records; 0 = follow forever
}

func auditCmd(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o auditOptions
	o.flags(fs, access.Auditor)
	fs.StringVar(&o.Host, "host", envOr("QUBESBUS_HOST", "local"), `host id, or "*" for every host`)
	fs.StringVar(&o.Since, "since", "", "start at a stream sequence, an RFC 3339 time, or a duration ago (10m); default: new records only")
	fs.BoolVar(&o.JSON, "json", false, "one JSON object per line")
	fs.IntVar(&o.Limit, "n", 0, "exit after this many records")
	if code, stop := parseFlags(fs, args, "audit [--host H|*] [--since SEQ|TIME|10m] [--json] [-n N]", stdout); stop {
		return code
	}
	if fs.NArg() != 0 {
		fmt.Fprintln(stderr, "qubesbus audit: unexpected arguments", fs.Args())
		return 2
	}
	if err := tailAudit(ctx, o, stdout, log); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(stderr, "qubesbus audit:", err)
		return 1
	}
	return 0
}

// tailAudit prints records from QUBES_AUDIT, through an ordered consumer as
// tailEvents does: no gap and no duplicate across reconnects, and `--since <last seq +
// 1>` resumes a stopped tail.
func tailAudit(ctx context.Context, o auditOptions, out io.Writer, log *slog.Logger) error {
	filter := subject.AllAudit()
	if o.Host != "*" {
		filter = subject.ForHost(o.Host).Audit()
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}, DeliverPolicy: jetstream.DeliverNewPolicy}
	if err := applySince(&cfg, o.Since); err != nil {
		return err
	}
	nc, err := o.connect(ctx, access.Auditor, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	cons, err := js.OrderedConsumer(ctx, audit.StreamName, cfg)
	if err != nil {
		return fmt.Errorf("audit consumer: %w", err)
	}
	it, err := cons.Messages()
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, it.Stop)
	enc := json.NewEncoder(out)
	for n := 0; o.Limit == 0 || n < o.Limit; {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		var r audit.Record
		if err := json.Unmarshal(msg.Data(), &r); err != nil {
			log.Warn("skipping undecodable record", "subject", msg.Subject(), "err", err)
			continue
		}
		meta, err := msg.Metadata()
		if err != nil {
			return err
		}
		if o.JSON {
			err = enc.Encode(struct {
				Seq uint64 `json:"seq"`
				audit.Record
			}{meta.Sequence.Stream, r})
		} else {
			_, err = io.WriteString(out, auditLine(meta.Sequence.Stream, r))
		}
		if err != nil {
			return err
		}
		n++
	}
	return nil
}

// auditLine is the human-readable form of a record, one line:
//
//	<seq> <time> <host> <source> → <method> <dest> <arg> <outcome> [<class>] [payload=N] [reason="…"] id=<request id>
//
// An empty field prints as "-"; one that holds spaces, quotes, control or non-ASCII
// bytes (a refused call may carry anything) is quoted, so a record cannot forge
// another line or drive the terminal.
func auditLine(seq uint64, r audit.Record) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d %s %s %s → %s %s %s %s", seq, r.Time.UTC().Format(time.RFC3339Nano), auditField(r.Host),
		auditField(r.Source), auditField(r.Method), auditField(r.Dest), auditField(r.Arg), auditField(r.Outcome))
	if r.Exception != "" {
		b.WriteString(" " + auditField(r.Exception))
	}
	if r.PayloadLen > 0 {
		fmt.Fprintf(&b, " payload=%d", r.PayloadLen)
	}
	if r.Reason != "" {
		b.WriteString(" reason=" + strconv.QuoteToASCII(r.Reason))
	}
	b.WriteString(" id=" + auditField(r.RequestID) + "\n")
	return b.String()
}

func auditField(s string) string {
	if s == "" {
		return "-"
	}
	if s == "-" {
		return `"-"`
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return strconv.QuoteToASCII(s)
		}
	}
	return s
}
