package devices

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/firewall"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// FirewallBucket is the key-value bucket where the rules each netvm enforces are
// published, laid out like qubesd's QubesDB entries of that netvm:
//
//	<host>/<netvm>/qubes-firewall/<ip>/policy   drop
//	<host>/<netvm>/qubes-firewall/<ip>/0000     action=accept proto=tcp …
//	<host>/<netvm>/qubes-firewall/<ip>          "" (written last: the set is complete)
//
// An agent (or a lab) watches <host>/<netvm>/qubes-firewall/> and reloads a client
// when its completion key is written. Key characters NATS does not allow (the ':' of
// an IPv6 address) are written as '='.
const FirewallBucket = "QUBES_FIREWALL"

// OpenFirewallBucket opens (creating if needed) the firewall bucket.
func OpenFirewallBucket(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	if replicas < 1 {
		replicas = 1
	}
	var kv jetstream.KeyValue
	err := bus.RetryJS(ctx, nil, "bucket "+FirewallBucket, func(ctx context.Context) error {
		var err error
		kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: FirewallBucket,
			Description: "firewall rules each netvm enforces, as QubesDB /qubes-firewall", Replicas: replicas})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("firewall bucket: %w", err)
	}
	return kv, nil
}

// firewallTable publishes rules to the bucket.
type firewallTable struct {
	kv   jetstream.KeyValue
	host subject.Host
	log  *slog.Logger
}

func newFirewallTable(kv jetstream.KeyValue, host subject.Host, log *slog.Logger) *firewallTable {
	return &firewallTable{kv: kv, host: host, log: log}
}

// FirewallKey is the bucket key of an entry of a qube's rules (entry "" is the
// completion key).
func FirewallKey(host, netvm, ip, entry string) string {
	k := host + "/" + netvm + "/qubes-firewall/" + strings.ReplaceAll(ip, ":", "=")
	if entry != "" {
		k += "/" + entry
	}
	return k
}

// publish replaces a qube's entries in its netvm's table, as qubesd's
// reload_firewall_for_vm does: old entries removed, new ones written, then the
// completion key.
func (t *firewallTable) publish(ctx context.Context, netvm, ip string, family int, rules []firewall.Rule, now time.Time) error {
	prefix := FirewallKey(t.host.ID(), netvm, ip, "")
	if lister, err := t.kv.ListKeysFiltered(ctx, prefix+"/>"); err == nil {
		for k := range lister.Keys() {
			if err := t.kv.Purge(ctx, k); err != nil {
				return fmt.Errorf("purge %s: %w", k, err)
			}
		}
	} else if !errors.Is(err, jetstream.ErrNoKeysFound) {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	for k, v := range firewall.QubesDB(rules, family, now) {
		if _, err := t.kv.PutString(ctx, prefix+"/"+k, v); err != nil {
			return fmt.Errorf("put %s: %w", k, err)
		}
	}
	if _, err := t.kv.PutString(ctx, prefix, ""); err != nil {
		return fmt.Errorf("put %s: %w", prefix, err)
	}
	return nil
}

// rulesOf returns a qube's rules: its firewall.xml, or qubesd's defaults without one.
func rulesOf(d *config.Domain) ([]firewall.Rule, error) {
	if d.Firewall == "" {
		return firewall.Default(), nil
	}
	rules, err := firewall.Unmarshal([]byte(d.Firewall))
	if err != nil {
		return nil, fmt.Errorf("%w: firewall of %s: %w", qerr.ErrAbort, d.Name(), err)
	}
	return rules, nil
}

func (s *Service) firewallGet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	var out []byte
	err := s.view(nil, func(m *model.Model) error {
		d := m.Domain(c.Dest.Name)
		if d == nil {
			return qerr.VMNotFoundError("No such domain: " + qerr.Repr(c.Dest.Name))
		}
		rules, err := rulesOf(d)
		if err != nil {
			return err
		}
		out = []byte(firewall.Get(rules, s.cfg.Now()))
		return nil
	})
	return out, err
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// firewallSet replaces a qube's rules. qubesd answers non-ASCII rules with a
// ProtocolError, and closes the connection without an answer on an invalid rule (an
// unhandled ValueError). Here an invalid rule is answered with QubesValueError and a
// message naming the line and the reason, so the tool shows why.
func (s *Service) firewallSet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if !isASCII(c.Payload) {
		return nil, qerr.ProtocolError("Rules contains non-ASCII characters")
	}
	rules, err := firewall.ParseRules(string(c.Payload))
	if err != nil {
		return nil, qerr.ValueError(err.Error())
	}
	return nil, s.saveFirewall(ctx, c.Dest.Name, func([]firewall.Rule) []firewall.Rule { return rules }, true)
}

// saveFirewall changes a qube's rules through the change log as qubesd's
// Firewall.save does: rules expired by now are left out, firewall-changed follows,
// and the netvm's table is updated. always publishes the event even if nothing
// changed (Set does; expiry only when a rule dropped out).
func (s *Service) saveFirewall(ctx context.Context, vm string, edit func([]firewall.Rule) []firewall.Rule, always bool) error {
	now := s.cfg.Now()
	changed := false
	var rules []firewall.Rule
	err := s.change(ctx, false, func(m *model.Model, _ func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
		d := m.Domain(vm)
		if d == nil {
			return nil, nil, qerr.VMNotFoundError("No such domain: " + qerr.Repr(vm))
		}
		old, err := rulesOf(d)
		if err != nil {
			return nil, nil, err
		}
		rules = nil
		for _, r := range edit(old) {
			if !r.Expired(now) {
				rules = append(rules, r)
			}
		}
		text := string(firewall.Marshal(rules))
		changed = text != d.Firewall
		if !changed {
			return nil, nil, nil
		}
		return []config.Op{{Kind: config.OpSetFirewall, Domain: d.ID, Value: text}}, nil, nil
	})
	if err != nil {
		return err
	}
	if !changed && !always {
		return nil
	}
	return s.firewallChanged(ctx, vm, rules)
}

// firewallChanged fires firewall-changed and, as qubesd's handler of it does, reloads
// the rules in the netvm of a running qube.
func (s *Service) firewallChanged(ctx context.Context, vm string, rules []firewall.Rule) error {
	if err := s.publish(ctx, cloudevent.New(vm, "firewall-changed")); err != nil {
		return err
	}
	return s.publishFirewallRules(ctx, vm, rules)
}

// publishFirewallOf writes a qube's current rules in its netvm's table, as qubesd
// does when the qube starts (no event).
func (s *Service) publishFirewallOf(ctx context.Context, vm string) error {
	var rules []firewall.Rule
	err := s.view(nil, func(m *model.Model) error {
		d := m.Domain(vm)
		if d == nil {
			return nil
		}
		var err error
		rules, err = rulesOf(d)
		return err
	})
	if err != nil || rules == nil {
		return err
	}
	return s.publishFirewallRules(ctx, vm, rules)
}

// publishFirewallRules writes rules in the table of the netvm of vm if vm runs.
func (s *Service) publishFirewallRules(ctx context.Context, vm string, rules []firewall.Rule) error {
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	type target struct {
		netvm, ip string
		family    int
	}
	var targets []target
	_ = s.view(rt, func(m *model.Model) error {
		h, err := m.Holder(vm)
		if err != nil || m.PowerState(vm) != "Running" {
			return nil
		}
		netvm := m.Ref(h, "netvm")
		if netvm == nil {
			return nil
		}
		for fam, prop := range map[int]string{4: "ip", 6: "ip6"} {
			if v, ok := m.Value(h, prop); ok && v.Text != "" {
				targets = append(targets, target{netvm.Name(), v.Text, fam})
			}
		}
		return nil
	})
	for _, t := range targets {
		if err := s.fw.publish(ctx, t.netvm, t.ip, t.family, rules, s.cfg.Now()); err != nil {
			s.log.Error("publish firewall rules", "vm", vm, "netvm", t.netvm, "err", err)
		}
	}
	return nil
}

// firewallReload fires firewall-changed (and reloads the netvm's table).
func (s *Service) firewallReload(ctx context.Context, c *rpc.Call) ([]byte, error) {
	var rules []firewall.Rule
	err := s.view(nil, func(m *model.Model) error {
		d := m.Domain(c.Dest.Name)
		if d == nil {
			return qerr.VMNotFoundError("No such domain: " + qerr.Repr(c.Dest.Name))
		}
		var err error
		rules, err = rulesOf(d)
		return err
	})
	if err != nil {
		return nil, err
	}
	return nil, s.firewallChanged(ctx, c.Dest.Name, rules)
}

// expireEvery is how often rules are checked for expiry. qubesd sets a timer at the
// nearest expiry; a second's delay is within what its own timer guarantees.
const expireEvery = time.Second

// expireLoop drops expired rules as qubesd's expiry timer does: the qube's
// firewall.xml is saved again without them, and firewall-changed follows.
func (s *Service) expireLoop(ctx context.Context) {
	t := time.NewTicker(expireEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := s.cfg.Now()
		var due []string
		s.rep.ViewIndexed(func(c *config.Config, _ func(string) *config.Domain) {
			for i := range c.Domains {
				d := &c.Domains[i]
				if !strings.Contains(d.Firewall, `<property name="expire">`) {
					continue
				}
				rules, err := firewall.Unmarshal([]byte(d.Firewall))
				if err != nil {
					continue
				}
				for _, r := range rules {
					if r.Expired(now) {
						due = append(due, d.Name())
						break
					}
				}
			}
		})
		for _, vm := range due {
			keep := func(rs []firewall.Rule) []firewall.Rule { return rs }
			if err := s.saveFirewall(ctx, vm, keep, false); err != nil {
				s.log.Warn("expire firewall rules", "vm", vm, "err", err)
			}
		}
	}
}
