package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// tailOptions select the events `qubesbus events` prints.
type tailOptions struct {
	streamClient
	Host  string // "*" for every host
	VM    string
	Type  string // glob on the wire event name, e.g. "property-set:*"
	Since string // stream sequence, RFC 3339 time, or a duration ago ("10m"); empty: new only
	JSON  bool
	Limit int // stop after this many events; 0 = follow forever
}

func eventsCmd(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("events", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o tailOptions
	o.flags(fs, access.Events)
	fs.StringVar(&o.Host, "host", envOr("QUBESBUS_HOST", "local"), `host id, or "*" for every host`)
	fs.StringVar(&o.VM, "vm", "", "only events of this qube")
	fs.StringVar(&o.Type, "type", "", `only events whose name matches this glob, e.g. "domain-*"`)
	fs.StringVar(&o.Since, "since", "", "start at a stream sequence, an RFC 3339 time, or a duration ago (10m); default: new events only")
	fs.BoolVar(&o.JSON, "json", false, "one JSON object per line")
	fs.IntVar(&o.Limit, "n", 0, "exit after this many events")
	if code, stop := parseFlags(fs, args, "events [--host H|*] [--vm NAME] [--type GLOB] [--since SEQ|TIME|10m] [--json] [-n N]", stdout); stop {
		return code
	}
	if err := tailEvents(ctx, o, stdout, log); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(stderr, "qubesbus events:", err)
		return 1
	}
	return 0
}

// tailEvents prints events from QUBES_EVENTS. It uses an ordered consumer, which
// recreates itself from the last sequence it delivered after a reconnect or a server
// restart, so the output has no gap and no duplicate.
func tailEvents(ctx context.Context, o tailOptions, out io.Writer, log *slog.Logger) error {
	if o.Type != "" {
		if _, err := path.Match(o.Type, ""); err != nil {
			return fmt.Errorf("--type: %w", err)
		}
	}
	nc, err := o.connect(ctx, access.Events, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{eventFilter(o.Host, o.VM)}, DeliverPolicy: jetstream.DeliverNewPolicy}
	if err := applySince(&cfg, o.Since); err != nil {
		return err
	}
	cons, err := js.OrderedConsumer(ctx, cloudevent.StreamName, cfg)
	if err != nil {
		return fmt.Errorf("events consumer: %w", err)
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
		ev, ce, err := cloudevent.Decode(ctx, &nats.Msg{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
		if err != nil {
			log.Warn("skipping undecodable message", "subject", msg.Subject(), "err", err)
			continue
		}
		if o.Type != "" {
			if ok, _ := path.Match(o.Type, ev.Name); !ok {
				continue
			}
		}
		meta, err := msg.Metadata()
		if err != nil {
			return err
		}
		// The subject names the host, unless a token in it was too long and is hashed
		// (subject.Token); the event's source always does.
		host, _, _, ok := subject.ParseEvent(msg.Subject())
		if !ok {
			host = cloudevent.HostOf(ce)
		}
		if o.JSON {
			kw := make(map[string]string, len(ev.Kwargs))
			for _, kv := range ev.Kwargs {
				kw[kv.Key] = kv.Value
			}
			err = enc.Encode(struct {
				Seq    uint64            `json:"seq"`
				Time   time.Time         `json:"time"`
				Host   string            `json:"host"`
				VM     string            `json:"vm,omitempty"`
				Event  string            `json:"event"`
				Kwargs map[string]string `json:"kwargs"`
				ID     string            `json:"id"`
			}{meta.Sequence.Stream, ce.Time(), host, ev.VM, ev.Name, kw, ce.ID()})
		} else {
			var b strings.Builder
			vm := ev.VM
			if vm == "" {
				vm = "-"
			}
			fmt.Fprintf(&b, "%d %s %s %s %s", meta.Sequence.Stream, ce.Time().UTC().Format(time.RFC3339Nano), host, vm, ev.Name)
			for _, kv := range ev.Kwargs {
				fmt.Fprintf(&b, " %s=%s", kv.Key, strconv.Quote(kv.Value))
			}
			b.WriteByte('\n')
			_, err = io.WriteString(out, b.String())
		}
		if err != nil {
			return err
		}
		n++
	}
	return nil
}

func eventFilter(host, vm string) string {
	h := subject.ForHost(host)
	switch {
	case host == "*" && vm == "":
		return subject.AllEvents()
	case host == "*":
		return subject.Prefix + ".*.events." + subject.Token(vm) + ".>"
	case vm == "":
		return h.Events()
	}
	return h.EventsOfFilter(vm)
}

func applySince(cfg *jetstream.OrderedConsumerConfig, since string) error {
	if since == "" {
		return nil
	}
	if seq, err := strconv.ParseUint(since, 10, 64); err == nil {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = seq
		return nil
	}
	var t time.Time
	if d, err := time.ParseDuration(since); err == nil {
		t = time.Now().Add(-d)
	} else if t, err = time.Parse(time.RFC3339Nano, since); err != nil {
		return fmt.Errorf("--since %q: not a sequence, duration or RFC 3339 time", since)
	}
	cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
	cfg.OptStartTime = &t
	return nil
}

// defaultNKey is the nkey seed a client command uses: the one given, else, when no
// other credentials are given, the role's key that `qubesbus run` keeps in its data
// dir, if there is one.
func defaultNKey(given, creds, user, dataDir, role string) string {
	if given != "" || creds != "" || user != "" || dataDir == "" {
		return given
	}
	seed := access.SeedFile(filepath.Join(dataDir, "nkeys"), role)
	if _, err := os.Stat(seed); err != nil {
		return ""
	}
	return seed
}
