package devices

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
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
	kv, err := bus.RetryJSFor(ctx, nil, "bucket "+FirewallBucket, func(ctx context.Context) (jetstream.KeyValue, error) {
		return js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: FirewallBucket,
			Description: "firewall rules each netvm enforces, as QubesDB /qubes-firewall", Replicas: replicas})
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
	// mu serialises the writers of the tables, each reading the rules it writes
	// under it, so a table never ends with rules older than the last written.
	mu sync.Mutex
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

// keysUnder lists the keys that begin with prefix. A NATS wildcard matches whole
// '.'-separated tokens only, and these keys hold '.' inside their parts (an IPv4
// address, a qube's name) but '/' between them: so the filter is the prefix's
// complete tokens followed by '>' (the whole bucket when it has none, as at a
// netvm's start) and the keys are then compared as strings.
func (t *firewallTable) keysUnder(ctx context.Context, prefix string) ([]string, error) {
	filter := ">"
	if i := strings.LastIndexByte(prefix, '.'); i >= 0 {
		filter = prefix[:i] + ".>"
	}
	lister, err := t.kv.ListKeysFiltered(ctx, filter)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", filter, err)
	}
	var keys []string
	for k := range lister.Keys() {
		if strings.HasPrefix(k, prefix) {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// purgeUnder removes every key that begins with prefix.
func (t *firewallTable) purgeUnder(ctx context.Context, prefix string) error {
	keys, err := t.keysUnder(ctx, prefix)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if err := t.kv.Purge(ctx, k); err != nil {
			return fmt.Errorf("purge %s: %w", k, err)
		}
	}
	return nil
}

// publish replaces a qube's entries in its netvm's table, as qubesd's
// reload_firewall_for_vm does: old entries removed (not the completion key, whose
// write tells the agent to reload), new ones written, then the completion key.
func (t *firewallTable) publish(ctx context.Context, netvm, ip string, family int, rules []firewall.Rule, now time.Time) error {
	prefix := FirewallKey(t.host.ID(), netvm, ip, "")
	if err := t.purgeUnder(ctx, prefix+"/"); err != nil {
		return err
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

// clear removes every entry of a netvm's table: a netvm that starts has a new
// QubesDB, holding only what dom0 writes into it then.
func (t *firewallTable) clear(ctx context.Context, netvm string) error {
	return t.purgeUnder(ctx, t.host.ID()+"/"+netvm+"/qubes-firewall/")
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

// fwTarget is one table entry set a qube's rules go to: its netvm, one of its
// addresses and that address's family.
type fwTarget struct {
	netvm, ip string
	family    int
}

// firewallTargets is where vm's rules go, as qubesd's reload_firewall_for_vm
// writes them: nowhere unless vm and its netvm run, else under each address vm has.
func firewallTargets(m *model.Model, vm string) []fwTarget {
	h, err := m.Holder(vm)
	if err != nil || m.PowerState(vm) != "Running" {
		return nil
	}
	netvm := m.Ref(h, "netvm")
	if netvm == nil || m.PowerState(netvm.Name()) != "Running" {
		return nil
	}
	var out []fwTarget
	for _, fam := range []int{4, 6} {
		prop := map[int]string{4: "ip", 6: "ip6"}[fam]
		if v, ok := m.Value(h, prop); ok && v.Text != "" {
			out = append(out, fwTarget{netvm.Name(), v.Text, fam})
		}
	}
	return out
}

// clientRules is a qube's rules and where they go.
type clientRules struct {
	vm      string
	rules   []firewall.Rule
	targets []fwTarget
}

// publishFirewallOf writes a qube's current rules in its netvm's table, as qubesd
// does when the qube starts (no event).
func (s *Service) publishFirewallOf(ctx context.Context, vm string) error {
	s.fw.mu.Lock()
	defer s.fw.mu.Unlock()
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	var c clientRules
	err = s.view(rt, func(m *model.Model) error {
		d := m.Domain(vm)
		if d == nil {
			return nil
		}
		if c.targets = firewallTargets(m, vm); len(c.targets) == 0 {
			return nil
		}
		rules, err := rulesOf(d)
		c.rules = rules
		return err
	})
	if err != nil {
		return err
	}
	s.writeRules(ctx, vm, c.rules, c.targets)
	return nil
}

// publishFirewallRules writes rules, just saved, in the table of the netvm of vm.
func (s *Service) publishFirewallRules(ctx context.Context, vm string, rules []firewall.Rule) error {
	s.fw.mu.Lock()
	defer s.fw.mu.Unlock()
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	var targets []fwTarget
	_ = s.view(rt, func(m *model.Model) error {
		targets = firewallTargets(m, vm)
		return nil
	})
	s.writeRules(ctx, vm, rules, targets)
	return nil
}

// reloadNetvmTable fills the table of a netvm that just started with the rules of
// every running qube connected to it, as qubesd's domain-qdb-create handler of a
// qube that provides network does (reload_firewall_for_vm for each running
// connected_vms): the table starts empty, as the netvm's new QubesDB, so rules left
// from its last run, or lost meanwhile, are replaced.
func (s *Service) reloadNetvmTable(ctx context.Context, netvm string) error {
	s.fw.mu.Lock()
	defer s.fw.mu.Unlock()
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	provides := false
	var clients []clientRules
	_ = s.view(rt, func(m *model.Model) error {
		h, err := m.Holder(netvm)
		if err != nil || !m.Bool(h, "provides_network") {
			return nil
		}
		provides = true
		for i := range m.C.Domains {
			d := &m.C.Domains[i]
			targets := firewallTargets(m, d.Name())
			if len(targets) == 0 || targets[0].netvm != netvm {
				continue
			}
			rules, err := rulesOf(d)
			if err != nil {
				s.log.Error("firewall rules of a client", "vm", d.Name(), "netvm", netvm, "err", err)
				continue
			}
			clients = append(clients, clientRules{d.Name(), rules, targets})
		}
		return nil
	})
	if !provides {
		return nil
	}
	if err := s.fw.clear(ctx, netvm); err != nil {
		return fmt.Errorf("clear the firewall table of %s: %w", netvm, err)
	}
	for _, c := range clients {
		s.writeRules(ctx, c.vm, c.rules, c.targets)
	}
	return nil
}

// writeRules writes rules at each target; the caller holds s.fw.mu. A failed write
// is logged: the rules are saved, the table is refreshed at the next change.
func (s *Service) writeRules(ctx context.Context, vm string, rules []firewall.Rule, targets []fwTarget) {
	for _, t := range targets {
		if err := s.fw.publish(ctx, t.netvm, t.ip, t.family, rules, s.cfg.Now()); err != nil {
			s.log.Error("publish firewall rules", "vm", vm, "netvm", t.netvm, "err", err)
		}
	}
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
