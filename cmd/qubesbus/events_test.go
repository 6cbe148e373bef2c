package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

type jsonEvent struct {
	Seq    uint64            `json:"seq"`
	Host   string            `json:"host"`
	VM     string            `json:"vm"`
	Event  string            `json:"event"`
	Kwargs map[string]string `json:"kwargs"`
}

func tail(t *testing.T, o tailOptions) []jsonEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	o.JSON = true
	var out bytes.Buffer
	if err := tailEvents(ctx, o, &out, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatalf("tail %+v: %v", o, err)
	}
	var evs []jsonEvent
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		var e jsonEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatal(err)
		}
		evs = append(evs, e)
	}
	return evs
}

func TestEventsTailResumesWithoutGapOrDuplicate(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sys, err := system.Start(ctx, system.Config{
		Socket: filepath.Join(dir, "s.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: "../../testdata/qubes.xml", HostID: "lab1", NATSPort: -1,
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()
	nc, err := sys.ConnectAs(ctx, access.Admin, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	pub := cloudevent.NewPublisher(js, "lab1")
	for i := 0; i < 10; i++ {
		vm := "work"
		if i%3 == 0 {
			vm = "sys-net"
		}
		if err := pub.Publish(ctx, cloudevent.New(vm, fmt.Sprintf("domain-feature-set:f%d", i), "feature", fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	// The tail reads the events role's key from the data dir, as `qubesbus events`
	// does by default against `qubesbus run`.
	base := tailOptions{streamClient: streamClient{NATSURL: sys.NATSURL, DataDir: filepath.Join(dir, "data")}, Host: "lab1"}

	first := base
	first.Since, first.Limit = "1", 4
	a := tail(t, first)
	second := base
	second.Since, second.Limit = fmt.Sprint(a[len(a)-1].Seq+1), 6
	b := tail(t, second)
	all := append(a, b...)
	for i, e := range all {
		if e.Seq != uint64(i+1) || e.Kwargs["feature"] != fmt.Sprint(i) || e.Host != "lab1" {
			t.Fatalf("event %d: %+v (gap, duplicate or wrong order)", i, e)
		}
	}

	onlyWork := base
	onlyWork.Since, onlyWork.VM, onlyWork.Limit = "1", "work", 6
	for _, e := range tail(t, onlyWork) {
		if e.VM != "work" {
			t.Fatalf("--vm work printed %+v", e)
		}
	}
	glob := base
	glob.Since, glob.Type, glob.Limit = "1", "domain-feature-set:f[12]", 2
	if got := tail(t, glob); len(got) != 2 || got[0].Event != "domain-feature-set:f1" || got[1].Event != "domain-feature-set:f2" {
		t.Fatalf("--type glob: %+v", got)
	}
	allHosts := base
	allHosts.Host, allHosts.Since, allHosts.Limit = "*", "1", 10
	if got := tail(t, allHosts); len(got) != 10 {
		t.Fatalf("--host '*': %d events", len(got))
	}
}
