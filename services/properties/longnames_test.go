package properties

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// flakyEvents fails the publish of any event whose name starts with a given prefix.
type flakyEvents struct {
	Events
	mu   sync.Mutex
	fail string
}

func (f *flakyEvents) failing(prefix string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = prefix
}

func (f *flakyEvents) Publish(ctx context.Context, evs ...cloudevent.Event) error {
	if err := f.injected(evs); err != nil {
		return err
	}
	return f.Events.Publish(ctx, evs...)
}

func (f *flakyEvents) Send(ctx context.Context, evs ...cloudevent.Event) (wait func(context.Context) error) {
	if err := f.injected(evs); err != nil {
		return func(context.Context) error { return err }
	}
	return f.Events.Send(ctx, evs...)
}

// injected is the failure of the first event whose name has the failing prefix.
func (f *flakyEvents) injected(evs []cloudevent.Event) error {
	f.mu.Lock()
	fail := f.fail
	f.mu.Unlock()
	for _, e := range evs {
		if fail != "" && strings.HasPrefix(e.Name, fail) {
			return fmt.Errorf("%w %s: injected failure", cloudevent.ErrPublish, cloudevent.LogName(e.Name))
		}
	}
	return nil
}

// short renders a long reply or event for a failure message.
func short(items ...string) string {
	var b strings.Builder
	for _, s := range items {
		b.WriteString(cloudevent.LogName(s))
		b.WriteString("; ")
	}
	return b.String()
}

// A name of any length a client may send is published (bounded subject, exact name in
// the event), stored and answered; a publish that fails before the change leaves the
// configuration unchanged, one that fails after it leaves the change standing.
func TestLongNamesAndFailedPublishes(t *testing.T) {
	h := newHarness(t, 0)
	nc := h.Connect()
	flaky := &flakyEvents{}
	s, err := New(Config{Host: h.Subjects, Lifecycle: h.powers, Events: flaky})
	if err != nil {
		t.Fatal(err)
	}
	// The real publisher, on a connection of its own.
	pubNC := h.Connect()
	js, err := jetstream.New(pubNC)
	if err != nil {
		t.Fatal(err)
	}
	flaky.Events = cloudevent.NewPublisher(js, h.Subjects.ID())
	ms, err := s.Serve(h.ctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ms.Stop() })

	expect := func(method, dest, arg, payload, want string, events ...string) {
		t.Helper()
		if got := h.call(method, dest, arg, payload); got != want {
			t.Fatalf("%s %s %s: got %s want %s", method, dest, cloudevent.LogName(arg), short(got), short(want))
		}
		got := h.events()
		if strings.Join(got, "\n") != strings.Join(events, "\n") {
			t.Fatalf("%s %s %s events:\n got %s\nwant %s", method, dest, cloudevent.LogName(arg), short(got...), short(events...))
		}
	}

	// 60 KiB names: valid (qubesd sets no length limit), stored, announced exactly.
	feat := strings.Repeat("f.", 30<<10)
	tag := strings.Repeat("t", 60<<10)
	expect("admin.vm.feature.Set", "work", feat, "1", "0:",
		"work|domain-feature-pre-set:"+feat+"|feature="+feat+",value=1",
		"work|domain-feature-set:"+feat+"|feature="+feat+",value=1")
	expect("admin.vm.feature.Get", "work", feat, "", "0:1")
	expect("admin.vm.tag.Set", "personal", tag, "", "0:", "personal|domain-tag-add:"+tag+"|tag="+tag)
	expect("admin.vm.tag.Get", "personal", tag, "", "0:1")
	// An unvalidated name with control bytes is announced exactly too.
	weird := "a\r\nb\x01" + strings.Repeat("\t", 5000)
	expect("admin.vm.feature.Remove", "work", weird, "",
		"2:QubesFeatureNotFoundError:Feature not set for domain work: "+weird,
		"work|domain-feature-pre-delete:"+weird+"|feature="+weird)

	// A pre-event that cannot be stored: nothing is applied.
	flaky.failing("domain-feature-pre-set:")
	expect("admin.vm.feature.Set", "work", "pre-fails", "1", "abort")
	flaky.failing("")
	expect("admin.vm.feature.Get", "work", "pre-fails", "", "2:QubesFeatureNotFoundError:Feature not set for domain work: pre-fails")

	// A post-event that cannot be stored after the change is durable: the call aborts,
	// the change stands.
	flaky.failing("domain-tag-add:")
	expect("admin.vm.tag.Set", "work", "post-fails", "", "abort")
	flaky.failing("")
	expect("admin.vm.tag.Get", "work", "post-fails", "", "0:1")
	expect("admin.vm.tag.Remove", "work", "post-fails", "", "0:", "work|domain-tag-delete:post-fails|tag=post-fails")

	// The service answers as before.
	expect("admin.vm.feature.Set", "work", "after", "1", "0:",
		"work|domain-feature-pre-set:after|feature=after,value=1", "work|domain-feature-set:after|feature=after,value=1")
}
