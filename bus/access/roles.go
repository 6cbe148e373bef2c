// Package access says who may do what on the bus: one NATS user per role (each
// service, the operators' admin, read-only event consumers, the lab), with the
// subjects each may publish and subscribe to. The table here is the only source:
// `qubesbus run` gives its embedded server these users with nkeys it generates
// (Keys), and deploy/nats/permissions.conf, for a server run by hand, is rendered
// from it (Conf).
//
// The boundaries that matter: only the gateway publishes on API subjects, so only it
// can assert a call's source (the Qubes-Source header); only the lab role and the
// admin can reach the fault-injection subjects; the events role reads the events
// stream and can call nothing; the webview role reads the events stream, the
// configuration history and snapshots and the power states, and can change nothing; only the gateway writes the audit trail (QUBES_AUDIT),
// and only the auditor role (and the admin) reads it.
package access

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// The roles.
const (
	Admin       = "admin"
	Persistence = "persistence"
	Properties  = "properties"
	VMLifecycle = "vmlifecycle"
	Storage     = "storage"
	Devices     = "devices"
	Backup      = "backup"
	Hypervisor  = "hypervisor"
	Gateway     = "gateway"
	Events      = "events"
	Auditor     = "auditor"
	Lab         = "lab"
	WebView     = "webview"
)

// Role is one NATS user of qubesbus.
type Role struct {
	Name      string
	About     string // a comment line in the rendered configuration
	Publish   []string
	Subscribe []string
}

// Subjects every service connection needs: replies to its own requests and micro
// discovery.
var (
	inbox     = "_INBOX.>"
	discovery = "$SRV.>"
	// jsClient is what a JetStream client needs to read streams and buckets it does
	// not manage (stream info, consumers, acks, flow control).
	jsClient = []string{"$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.CONSUMER.>", "$JS.ACK.>", "$JS.FC.>"}
)

// readStream is what a JetStream client needs to read one stream through consumers
// of its own (an ordered consumer, as `qubesbus events` and `qubesbus audit` use, or a
// push consumer with flow control): the consumer API of that stream only, so the
// role cannot read the other streams.
func readStream(stream string) []string {
	return []string{"$JS.API.INFO", "$JS.API.STREAM.INFO." + stream,
		"$JS.API.CONSUMER.CREATE." + stream, "$JS.API.CONSUMER.CREATE." + stream + ".>",
		"$JS.API.CONSUMER.DURABLE.CREATE." + stream + ".*", "$JS.API.CONSUMER.INFO." + stream + ".*",
		"$JS.API.CONSUMER.DELETE." + stream + ".*", "$JS.API.CONSUMER.MSG.NEXT." + stream + ".*",
		"$JS.FC.>"} // flow-control replies: they carry no data and read nothing
}

// events lists the event subjects of the given families, e.g. property-set becomes
// qubes.v1.*.events.*.property-set.> (the event with any suffix).
func events(families ...string) []string {
	out := make([]string, len(families))
	for i, f := range families {
		out[i] = "qubes.v1.*.events.*." + f + ".>"
	}
	return out
}

// plainEvents lists events without a suffix (domain-start).
func plainEvents(names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = "qubes.v1.*.events.*." + n
	}
	return out
}

func join(lists ...[]string) []string {
	var out []string
	for _, l := range lists {
		out = append(out, l...)
	}
	return out
}

// union is join without repeats, in first-seen order.
func union(lists ...[]string) []string {
	var out []string
	for _, s := range join(lists...) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// Roles in the order the rendered configuration lists them.
var Roles = []Role{
	{Name: Admin, About: "Creates and updates the streams and buckets (qubesbus setup); operators.",
		Publish: []string{">"}, Subscribe: []string{">"}},
	{Name: Persistence, About: "The configuration store: its API, the change log, the lock bucket.",
		Publish:   []string{inbox, discovery, "qubes.v1.*.config", "qubes.v1.*.config.>", "$JS.API.>", "$KV.>"},
		Subscribe: []string{inbox, discovery, "qubes.v1.*.store.>", "$KV.>"}},
	{Name: Properties, About: "Properties, features, tags, labels, notes, create and remove: only the events it fires.",
		Publish: join([]string{inbox, discovery}, jsClient,
			[]string{"qubes.v1.*.store.>", "qubes.v1.*.svc.vmlifecycle.states", "qubes.v1.*.svc.vmlifecycle.runtime",
				"qubes.v1.*.svc.vmlifecycle.hold", "qubes.v1.*.svc.vmlifecycle.release",
				"qubes.v1.*.svc.storage.create", "qubes.v1.*.svc.storage.remove",
				"$KV.QUBES_NOTES.>", "$JS.API.STREAM.*.KV_QUBES_NOTES", "$JS.API.DIRECT.GET.KV_QUBES_NOTES", "$JS.API.DIRECT.GET.KV_QUBES_NOTES.>"},
			events("property-pre-set", "property-set", "property-pre-reset", "property-pre-del", "property-reset", "property-del",
				"domain-feature-pre-set", "domain-feature-set", "domain-feature-pre-delete", "domain-feature-delete",
				"domain-tag-add", "domain-tag-delete"),
			[]string{"qubes.v1.*.events._app.domain-add", "qubes.v1.*.events._app.domain-pre-delete",
				"qubes.v1.*.events._app.domain-delete", "qubes.v1.*.events.*.domain-create-on-disk"},
			// preload-dispvm-max's handlers and CreateDisposable+preload announce it.
			plainEvents("domain-preload-dispvm-start")),
		Subscribe: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.config", "qubes.v1.*.config.>", "qubes.v1.*.svc.vmlifecycle.changed"}},
	{Name: Storage, About: "Pools and volumes: its API, the clone-token and simulated-volume buckets, its consumer of power events, only the events it fires.",
		Publish: join([]string{inbox, discovery}, jsClient,
			[]string{"qubes.v1.*.store.>", "qubes.v1.*.svc.vmlifecycle.states",
				"$KV.QUBES_CLONE_TOKENS.>", "$JS.API.STREAM.*.KV_QUBES_CLONE_TOKENS", "$JS.API.DIRECT.GET.KV_QUBES_CLONE_TOKENS", "$JS.API.DIRECT.GET.KV_QUBES_CLONE_TOKENS.>",
				// Simulated volumes: reads, CAS writes (a read waits for the stream's
				// last sequence: STREAM.INFO, in jsClient).
				"$KV.QUBES_SIMPOOLS.>", "$JS.API.STREAM.*.KV_QUBES_SIMPOOLS",
				"$JS.API.DIRECT.GET.KV_QUBES_SIMPOOLS", "$JS.API.DIRECT.GET.KV_QUBES_SIMPOOLS.>",
				"qubes.v1.*.events._app.pool-add", "qubes.v1.*.events._app.pool-pre-delete", "qubes.v1.*.events._app.pool-delete"},
			// domain-cmd-pre-run: an online resize runs qubes.ResizeDisk in the qube.
			plainEvents("domain-import-volume", "domain-volume-import-begin", "domain-volume-import-end", "domain-cmd-pre-run")),
		Subscribe: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.config", "qubes.v1.*.config.>",
			"qubes.v1.*.svc.storage.>", "qubes.v1.*.lab.storage-faults"}},
	{Name: Devices, About: "Devices and firewall: the hypervisor's device calls, the firewall and device-record buckets, its consumer of power events, only the events it fires.",
		Publish: join([]string{inbox, discovery}, jsClient,
			[]string{"qubes.v1.*.store.>", "qubes.v1.*.svc.vmlifecycle.runtime",
				"qubes.v1.*.hv.devices", "qubes.v1.*.hv.device-attach", "qubes.v1.*.hv.device-detach",
				"$KV.QUBES_FIREWALL.>", "$JS.API.STREAM.*.KV_QUBES_FIREWALL", "$JS.API.DIRECT.GET.KV_QUBES_FIREWALL", "$JS.API.DIRECT.GET.KV_QUBES_FIREWALL.>",
				"$KV.QUBES_DEVICES.>", "$JS.API.STREAM.*.KV_QUBES_DEVICES", "$JS.API.DIRECT.GET.KV_QUBES_DEVICES", "$JS.API.DIRECT.GET.KV_QUBES_DEVICES.>",
				"qubes.v1.*.events.*.property-pre-set.devices_denied", "qubes.v1.*.events.*.property-set.devices_denied"},
			events("device-pre-attach", "device-attach", "device-pre-detach", "device-detach", "device-pre-assign", "device-assign",
				"device-unassign", "device-assignment-changed", "device-added", "device-removed", "device-list-change"),
			plainEvents("firewall-changed")),
		Subscribe: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.config", "qubes.v1.*.config.>",
			"qubes.v1.*.svc.devices.>", "qubes.v1.*.hvdevices"}},
	{Name: Backup, About: "Backups: its API, volume data from storage, backup timestamps through the store, only the events it fires.",
		Publish: join([]string{inbox, discovery}, jsClient,
			[]string{"qubes.v1.*.store.>", "qubes.v1.*.svc.vmlifecycle.states",
				"qubes.v1.*.svc.storage.export", "qubes.v1.*.svc.storage.read",
				"qubes.v1.*.events._app.backup-progress",
				"qubes.v1.*.events.*.property-pre-set.backup_timestamp", "qubes.v1.*.events.*.property-set.backup_timestamp"},
			plainEvents("backup-get-files")),
		Subscribe: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.config", "qubes.v1.*.config.>"}},
	{Name: VMLifecycle, About: "Power states over the hypervisor: only the events it fires.",
		Publish: join([]string{inbox, discovery}, jsClient,
			[]string{"qubes.v1.*.store.>", "qubes.v1.*.svc.vmlifecycle.stats", "qubes.v1.*.svc.vmlifecycle.changed",
				"qubes.v1.*.hv.>", "$KV.QUBES_LEASES.>",
				// A create that finds the key taken reads it (was it deleted?).
				"$JS.API.STREAM.*.KV_QUBES_LEASES", "$JS.API.DIRECT.GET.KV_QUBES_LEASES", "$JS.API.DIRECT.GET.KV_QUBES_LEASES.>",
				"qubes.v1.*.svc.storage.verify", "qubes.v1.*.svc.storage.prepare", "qubes.v1.*.svc.storage.stop", "qubes.v1.*.svc.storage.remove",
				"qubes.v1.*.svc.devices.prepare-start", "qubes.v1.*.svc.devices.attach-required",
				"qubes.v1.*.events._app.domain-pre-delete", "qubes.v1.*.events._app.domain-delete"},
			plainEvents("domain-pre-start", "domain-start-failed", "domain-verify-files", "domain-pre-spawn", "domain-spawn",
				"domain-qdb-create", "domain-pre-unpaused", "domain-unpaused", "domain-start", "domain-pre-shutdown",
				"domain-shutdown-failed", "domain-stopped", "domain-shutdown", "domain-pre-paused", "domain-paused",
				"domain-resumed", "property-reset.xid", "property-reset.stubdom_xid", "property-reset.start_time")),
		Subscribe: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.svc.vmlifecycle.>", "qubes.v1.*.config", "qubes.v1.*.config.>"}},
	{Name: Hypervisor, About: "The (simulated) hypervisor: its driver API, its notices, and the lab's faults.",
		Publish:   []string{inbox, discovery, "$JS.API.INFO", "$JS.API.STREAM.INFO.QUBES_HV", "qubes.v1.*.hvnotice", "qubes.v1.*.hvdevices"},
		Subscribe: []string{inbox, discovery, "qubes.v1.*.hv.>", "qubes.v1.*.lab.>"}},
	{Name: Gateway, About: "The socket: the only role that may send Admin API calls, and so assert their source.",
		Publish: []string{inbox, discovery, "qubes.v1.*.api.>", "qubes.v1.*.cancel.*", "qubes.v1.*.svc.vmlifecycle.stats-lease",
			"$JS.API.INFO", "$JS.API.STREAM.INFO.QUBES_EVENTS", "$JS.API.CONSUMER.>",
			"qubes.v1.*.audit"},
		Subscribe: []string{inbox, discovery, "qubes.v1.*.svc.vmlifecycle.stats"}},
	{Name: Events, About: "Event consumers (qubesbus events, dashboards): read the events stream only; may call nothing.",
		Publish:   readStream("QUBES_EVENTS"),
		Subscribe: []string{inbox}},
	{Name: Auditor, About: "Audit readers (qubesbus audit): read the audit stream only; may call nothing.",
		Publish:   readStream("QUBES_AUDIT"),
		Subscribe: []string{inbox}},
	{Name: WebView, About: "The web view (--http /): reads the events stream, the configuration (history, snapshots) and power states; may change nothing.",
		Publish: union(readStream("QUBES_EVENTS"), readStream("QUBES_CONFIG"),
			// The two read-only questions it asks the services: a host's configuration
			// and its qubes' power states. Not store.> (that applies mutations) nor
			// api.> (only the gateway may assert a call's source).
			[]string{"qubes.v1.*.store.snapshot", "qubes.v1.*.svc.vmlifecycle.states"}),
		Subscribe: []string{inbox}},
	{Name: Lab, About: "Test labs: fault injection on the simulated hypervisor; may call nothing.",
		Publish:   []string{"qubes.v1.*.lab.>"},
		Subscribe: []string{inbox}},
}

// Find returns the role of a name.
func Find(name string) (Role, bool) {
	for _, r := range Roles {
		if r.Name == name {
			return r, true
		}
	}
	return Role{}, false
}

// Permissions are the role's permissions for nats-server.
//
// Replies: a role receives them only on its own inbox prefix (InboxPrefix), so no role
// can read the replies to another's requests (the events role those of the gateway's
// calls, say). A role whose table lists the inbox among what it publishes answers
// requests: it may send one reply to each request it received (allow_responses),
// not publish on inboxes at large.
func (r Role) Permissions() *server.Permissions {
	p := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: r.publish()},
		Subscribe: &server.SubjectPermission{Allow: r.subscribe()},
	}
	if r.responds() {
		p.Response = &server.ResponsePermission{MaxMsgs: 1, Expires: ResponseTTL}
	}
	return p
}

// ResponseTTL bounds how long after a request its one reply may come: the longest
// call (a shutdown waiting for the qube, within the gateway's 10-minute call bound).
const ResponseTTL = 30 * time.Minute

// InboxPrefix is the prefix of a role's reply subjects (nats.CustomInboxPrefix); a
// client connecting as the role must use it.
func InboxPrefix(role string) string { return "_INBOX_" + role }

func (r Role) responds() bool { return slices.Contains(r.Publish, inbox) }

func (r Role) publish() []string {
	if r.Name == Admin {
		return slices.Clone(r.Publish)
	}
	return slices.DeleteFunc(slices.Clone(r.Publish), func(s string) bool { return s == inbox })
}

func (r Role) subscribe() []string {
	if r.Name == Admin {
		return slices.Clone(r.Subscribe)
	}
	out := slices.Clone(r.Subscribe)
	for i, s := range out {
		if s == inbox {
			out[i] = InboxPrefix(r.Name) + ".>"
		}
	}
	return out
}

// Conf renders the roles as a nats-server authorization block whose passwords come
// from environment variables (QUBESBUS_<ROLE>_PASSWORD), for deploy/nats.
func Conf() string {
	var b strings.Builder
	b.WriteString(`# Generated from bus/access (go run ./cmd/qubesbus setup --print-permissions):
# do not edit by hand. One NATS user per role; each may publish only its own subjects,
# in particular only the events it fires. Passwords come from the environment (never
# commit them): QUBESBUS_<ROLE>_PASSWORD.
#
# Event subjects: qubes.v1.<host>.events.<qube|_app>.<event>[.<suffix>], where an event
# "property-set:netvm" is the two tokens property-set.netvm.
#
# The audit trail (stream QUBES_AUDIT, subjects qubes.v1.<host>.audit): only the gateway
# publishes on it; the auditor role and the admin read it, the events role cannot.

authorization {
  users = [
`)
	for i, r := range Roles {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "    # %s\n", r.About)
		fmt.Fprintf(&b, "    { user: %s, password: $QUBESBUS_%s_PASSWORD, permissions: {\n", r.Name, strings.ToUpper(r.Name))
		fmt.Fprintf(&b, "        publish:   { allow: %s }\n", list(r.publish()))
		fmt.Fprintf(&b, "        subscribe: { allow: %s }\n", list(r.subscribe()))
		if r.responds() {
			fmt.Fprintf(&b, "        allow_responses: { max: 1, expires: %q }\n", ResponseTTL.String())
		}
		b.WriteString("    } }\n")
	}
	b.WriteString("  ]\n}\n")
	return b.String()
}

func list(subjects []string) string {
	q := make([]string, len(subjects))
	for i, s := range subjects {
		q[i] = `"` + s + `"`
	}
	return "[" + strings.Join(q, ", ") + "]"
}
