// Package access says who may do what on the bus: one NATS user per role (each
// service, the operators' admin, read-only event consumers, the lab), with the
// subjects each may publish and subscribe to. The table here is the only source:
// `qubesbus run` gives its embedded server these users with nkeys it generates
// (Keys), and deploy/nats/permissions.conf, for a server run by hand, is rendered
// from it (Conf).
//
// The boundaries that matter: only the gateway publishes on API subjects, so only it
// can assert a call's source (the Qubes-Source header), and each service subscribes
// only to the API subjects of its own methods; each service sends configuration
// changes only under its own name, and persistence applies only what that service
// owns (configstore.Permits); only the lab role and the
// admin can reach the fault-injection subjects; the events role reads the events
// stream and can call nothing; the webview role reads the events stream, the
// configuration history and snapshots and the power states, and can change nothing;
// only the gateway writes the audit trail (QUBES_AUDIT), and only the auditor role
// (and the admin) reads it.
//
// Every subject comes from a builder of bus/subject with the constants of the
// contract it belongs to (schemas/lifecycle's OpHold, schemas/storage's OpVerify, …),
// and every stream and bucket from its owner's constant: no internal operation,
// service, stream or bucket name is spelled a second time here.
package access

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/devices"
	"github.com/qubesbus/qubesbus/services/properties"
	"github.com/qubesbus/qubesbus/services/storage"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/hvbus"
)

// The roles: each service's is its name (bus/rpc), the only spelling of service
// names; the others are people and tools.
const (
	Admin       = "admin"
	Persistence = string(rpc.Persistence)
	Properties  = string(rpc.Properties)
	VMLifecycle = string(rpc.VMLifecycle)
	Storage     = string(rpc.Storage)
	Devices     = string(rpc.Devices)
	Backup      = string(rpc.Backup)
	Hypervisor  = string(rpc.Hypervisor)
	Gateway     = string(rpc.Gateway)
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
	// jsClient is what every JetStream client of a service needs: account and stream
	// info, acks and flow control. Consumers only on the streams each reads
	// (readStream), so that no service reads the audit trail or another's buckets.
	jsClient = []string{"$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.ACK.>", "$JS.FC.>"}
	// readConfig is what a replica of the configuration needs (schemas/replica): its
	// ordered consumer of QUBES_CONFIG, and the reads of single records from the
	// stream leader with which it catches up when the consumer lags (a failover).
	readConfig = union(readStream(changelog.StreamName), []string{"$JS.API.STREAM.MSG.GET." + changelog.StreamName,
		"$JS.API.DIRECT.GET." + changelog.StreamName, "$JS.API.DIRECT.GET." + changelog.StreamName + ".>"})
)

// Subjects of every host (subject.AnyHost), built from the contracts' constants: an
// internal operation is named once, in the contract its caller and its handler share.
var (
	anyHost = subject.AnyHost()
	// api and cancel: Admin API calls and their cancel notices.
	api    = anyHost.APIAll()
	cancel = anyHost.CancelAll()
	// store is persistence's whole API (configstore.Op*): what persistence hears.
	store = anyHost.Store(subject.Rest)
	// configLog is the change log and the notices beside it (ConfigSynced).
	configLog = []string{anyHost.Config(), anyHost.Config() + "." + subject.Rest}
)

// storeOf is what a service may ask persistence: the reads, flushes and syncs, and
// applies only under its own name (configstore.ApplySubject), so persistence knows
// from the subject who asks and applies only what that service owns
// (configstore.Permits).
func storeOf(role string) []string {
	return []string{anyHost.Store(configstore.OpSnapshot), anyHost.Store(configstore.OpFlush),
		anyHost.Store(configstore.OpSync), anyHost.Store(configstore.OpMetrics), configstore.ApplySubject(anyHost, role)}
}

// lifecycleOps, storageOps and devicesOps are the subjects of those services'
// internal operations (subject.Host.Service).
func lifecycleOps(ops ...string) []string { return serviceOps(lifecycle.ServiceToken, ops) }
func storageOps(ops ...string) []string   { return serviceOps(storageapi.ServiceToken, ops) }
func devicesOps(ops ...string) []string   { return serviceOps(devicectl.ServiceToken, ops) }

func serviceOps(service string, ops []string) []string {
	out := make([]string, len(ops))
	for i, op := range ops {
		out[i] = anyHost.Service(service, op)
	}
	return out
}

// hypervisorOps are subjects of the hypervisor's driver API (subject.Host.Hypervisor).
func hypervisorOps(ops ...string) []string {
	out := make([]string, len(ops))
	for i, op := range ops {
		out[i] = anyHost.Hypervisor(op)
	}
	return out
}

// bucket is what a client needs to read and write one KV bucket: its messages, its
// stream's info and direct gets.
func bucket(name string) []string {
	stream := "KV_" + name
	return []string{"$KV." + name + ".>", "$JS.API.STREAM.*." + stream,
		"$JS.API.DIRECT.GET." + stream, "$JS.API.DIRECT.GET." + stream + ".>"}
}

// apiOf lists the API subjects of the given methods (a trailing ".>" for a family):
// what a service subscribes to, each only its own methods (the registry's owner), so
// that no service hears, or answers, the calls of another.
func apiOf(methods ...string) []string {
	out := make([]string, len(methods))
	for i, m := range methods {
		out[i] = anyHost.API(m)
	}
	return out
}

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
		out[i] = anyHost.EventOfEveryVM(f) + "." + subject.Rest
	}
	return out
}

// plainEvents lists events of every qube by their exact names: domain-start, or
// property-reset:xid for one suffix only.
func plainEvents(names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = anyHost.EventOfEveryVM(n)
	}
	return out
}

// globalEvents lists events of the app object (no qube): domain-add.
func globalEvents(names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = anyHost.Event("", n)
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
	{Name: Persistence, About: "The configuration store: its API and the change log (" + changelog.StreamName + ": creates, writes, reads and compacts it; no other stream).",
		Publish: union([]string{inbox, discovery}, configLog,
			[]string{"$JS.API.STREAM.CREATE." + changelog.StreamName, "$JS.API.STREAM.PURGE." + changelog.StreamName}, readConfig),
		Subscribe: []string{inbox, discovery, store}},
	{Name: Properties, About: "Properties, features, tags, labels, notes, create and remove: hears only its own methods (and unknown ones); only the events it fires.",
		Publish: union([]string{inbox, discovery}, jsClient, readConfig, storeOf(Properties),
			lifecycleOps(lifecycle.OpStates, lifecycle.OpRuntime, lifecycle.OpHold, lifecycle.OpRelease),
			storageOps(storageapi.OpCreate, storageapi.OpRemove),
			bucket(properties.NotesBucket),
			events("property-pre-set", "property-set", "property-pre-reset", "property-pre-del", "property-reset", "property-del",
				"domain-feature-pre-set", "domain-feature-set", "domain-feature-pre-delete", "domain-feature-delete",
				"domain-tag-add", "domain-tag-delete"),
			globalEvents("domain-add", "domain-pre-delete", "domain-delete"),
			plainEvents("domain-create-on-disk"),
			// preload-dispvm-max's handlers and CreateDisposable+preload announce it.
			plainEvents("domain-preload-dispvm-start")),
		Subscribe: join([]string{inbox, discovery},
			// Its methods; calls of methods not in the registry (_unknown) and the checks
			// of admin.Events, which it resolves for the gateway.
			apiOf("admin.vm.List", "admin.vmclass.List", "admin.vm.property.>", "admin.property.>", "admin.vm.feature.>",
				"admin.vm.tag.>", "admin.label.>", "admin.vm.notes.>", "admin.deviceclass.List",
				"admin.vm.Create.>", "admin.vm.CreateInPool.>", "admin.vm.CreateDisposable", "admin.vm.Remove",
				"admin.Events", subject.UnknownMethod),
			[]string{cancel}, configLog, lifecycleOps(lifecycle.SubjectChanged))},
	{Name: Storage, About: "Pools and volumes: hears only admin.pool.* and admin.vm.volume.*; the clone-token and simulated-volume buckets, its consumer of power events, only the events it fires.",
		Publish: union([]string{inbox, discovery}, jsClient, readConfig, readStream(cloudevent.StreamName),
			readStream("KV_"+storage.SimBucket), storeOf(Storage),
			lifecycleOps(lifecycle.OpStates),
			bucket(storage.TokenBucket),
			// Simulated volumes: reads, CAS writes (a read waits for the stream's
			// last sequence: STREAM.INFO, in jsClient).
			bucket(storage.SimBucket),
			globalEvents("pool-add", "pool-pre-delete", "pool-delete"),
			// domain-cmd-pre-run: an online resize runs qubes.ResizeDisk in the qube.
			plainEvents("domain-import-volume", "domain-volume-import-begin", "domain-volume-import-end", "domain-cmd-pre-run")),
		Subscribe: join([]string{inbox, discovery}, apiOf("admin.pool.>", "admin.vm.volume.>"), []string{cancel}, configLog,
			storageOps(subject.Rest), []string{anyHost.Lab(storageapi.LabOpFaults)})},
	{Name: Devices, About: "Devices and firewall: hears only admin.vm.device.* and admin.vm.firewall.*; the hypervisor's device calls, the firewall and device-record buckets, its consumer of power events, only the events it fires.",
		Publish: union([]string{inbox, discovery}, jsClient, readConfig, readStream(cloudevent.StreamName),
			readStream("KV_"+devices.FirewallBucket), readStream("KV_"+devices.DevicesBucket), storeOf(Devices),
			lifecycleOps(lifecycle.OpRuntime),
			hypervisorOps(hostdev.OpDevices, hostdev.OpAttach, hostdev.OpDetach),
			bucket(devices.FirewallBucket), bucket(devices.DevicesBucket),
			plainEvents("property-pre-set:devices_denied", "property-set:devices_denied"),
			events("device-pre-attach", "device-attach", "device-pre-detach", "device-detach", "device-pre-assign", "device-assign",
				"device-unassign", "device-assignment-changed", "device-added", "device-removed", "device-list-change"),
			plainEvents("firewall-changed")),
		Subscribe: join([]string{inbox, discovery}, apiOf("admin.vm.device.>", "admin.vm.firewall.>"), []string{cancel}, configLog,
			devicesOps(subject.Rest), []string{anyHost.HypervisorDevices()})},
	{Name: Backup, About: "Backups: hears only admin.backup.*; volume data from storage, backup timestamps through the store, only the events it fires.",
		Publish: union([]string{inbox, discovery}, jsClient, readConfig, storeOf(Backup),
			lifecycleOps(lifecycle.OpStates),
			storageOps(storageapi.OpExport, storageapi.OpRead),
			globalEvents("backup-progress"),
			plainEvents("property-pre-set:backup_timestamp", "property-set:backup_timestamp", "backup-get-files")),
		Subscribe: join([]string{inbox, discovery}, apiOf("admin.backup.>"), []string{cancel}, configLog)},
	{Name: VMLifecycle, About: "Power states over the hypervisor: hears only its power methods; only the events it fires.",
		Publish: union([]string{inbox, discovery}, jsClient, readConfig, readStream(hvbus.NoticeStream), storeOf(VMLifecycle),
			lifecycleOps(lifecycle.SubjectStats, lifecycle.SubjectChanged),
			hypervisorOps(subject.Rest),
			// The lease: a create that finds the key taken reads it (was it deleted?).
			bucket(lease.Bucket),
			storageOps(storageapi.OpVerify, storageapi.OpPrepare, storageapi.OpStop, storageapi.OpRemove),
			devicesOps(devicectl.OpPrepareStart, devicectl.OpAttachRequired),
			globalEvents("domain-pre-delete", "domain-delete"),
			plainEvents("domain-pre-start", "domain-start-failed", "domain-verify-files", "domain-pre-spawn", "domain-spawn",
				"domain-qdb-create", "domain-pre-unpaused", "domain-unpaused", "domain-start", "domain-pre-shutdown",
				"domain-shutdown-failed", "domain-stopped", "domain-shutdown", "domain-pre-paused", "domain-paused",
				"domain-resumed", "property-reset:xid", "property-reset:stubdom_xid", "property-reset:start_time")),
		Subscribe: join([]string{inbox, discovery},
			apiOf("admin.vm.Start", "admin.vm.Shutdown", "admin.vm.Kill", "admin.vm.Pause", "admin.vm.Unpause",
				"admin.vm.Suspend", "admin.vm.Resume", "admin.vm.CurrentState", "admin.vm.Stats", "admin.vm.Console"),
			[]string{cancel}, lifecycleOps(subject.Rest), configLog)},
	{Name: Hypervisor, About: "The (simulated) hypervisor: its driver API, its notices, and the lab's faults.",
		Publish: []string{inbox, discovery, "$JS.API.INFO", "$JS.API.STREAM.INFO." + hvbus.NoticeStream,
			anyHost.HypervisorNotices(), anyHost.HypervisorDevices()},
		Subscribe: []string{inbox, discovery, anyHost.Hypervisor(subject.Rest), anyHost.Lab(subject.Rest)}},
	{Name: Gateway, About: "The socket: the only role that may send Admin API calls, and so assert their source.",
		Publish: union([]string{inbox, discovery, api, cancel}, lifecycleOps(lifecycle.OpStatsLease),
			readStream(cloudevent.StreamName), []string{anyHost.Audit()}),
		// The events' own subjects: admin.Events relays each as it is published, before
		// the stream's copy comes (gateway's hub).
		Subscribe: join([]string{inbox, discovery, anyHost.Events()}, lifecycleOps(lifecycle.SubjectStats))},
	{Name: Events, About: "Event consumers (qubesbus events, dashboards): read the events stream only; may call nothing.",
		Publish:   readStream(cloudevent.StreamName),
		Subscribe: []string{inbox}},
	{Name: Auditor, About: "Audit readers (qubesbus audit): read the audit stream only; may call nothing.",
		Publish:   readStream(audit.StreamName),
		Subscribe: []string{inbox}},
	{Name: WebView, About: "The web view (--http /): reads the events stream, the configuration (history, snapshots) and power states; may change nothing.",
		Publish: union(readStream(cloudevent.StreamName), readConfig,
			// The two read-only questions it asks the services: a host's configuration
			// and its qubes' power states. Not store.> (that applies mutations) nor
			// api.> (only the gateway may assert a call's source).
			[]string{anyHost.Store(configstore.OpSnapshot)}, lifecycleOps(lifecycle.OpStates)),
		Subscribe: []string{inbox}},
	{Name: Lab, About: "Test labs: fault injection on the simulated hypervisor; may call nothing.",
		Publish:   []string{anyHost.Lab(subject.Rest)},
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

// EventDurables are the durable consumers of QUBES_EVENTS that a host's services keep
// (storage's and devices' power events, named so by services/storage and
// services/devices), each with the role that owns it.
func EventDurables(host string) [][2]string {
	h := subject.ForHost(host)
	return [][2]string{{Storage, storage.PowerConsumer(h)}, {Devices, devices.PowerConsumer(h)}}
}

// PermissionsFor is Permissions on a server that serves the given hosts (an embedded
// one: `qubesbus run`, a lab). Every role that may open consumers on QUBES_EVENTS may
// name any consumer, so it could delete, change or pull from a service's durable
// consumer (storage would stop following power states until restarted): here every
// role but the owner (and the admin) is denied the consumer API subjects of each
// host's durables. (NATS wildcards match whole tokens, and a durable's name holds its
// host: a server configured by hand lists its hosts' the same way, see README.)
func (r Role) PermissionsFor(hosts []string) *server.Permissions {
	p := r.Permissions()
	if r.Name == Admin {
		return p
	}
	for _, h := range hosts {
		for _, d := range EventDurables(h) {
			if d[0] == r.Name {
				continue
			}
			for _, subj := range DurableAPI(d[1]) {
				// Only what the role's allowances would let through.
				if slices.ContainsFunc(p.Publish.Allow, func(a string) bool { return server.SubjectsCollide(a, subj) }) {
					p.Publish.Deny = append(p.Publish.Deny, subj)
				}
			}
		}
	}
	return p
}

// DurableAPI lists the consumer API subjects that name a durable of QUBES_EVENTS:
// create or update (with or without a filter), info, delete and pulls.
func DurableAPI(name string) []string {
	stream := cloudevent.StreamName
	return []string{"$JS.API.CONSUMER.*." + stream + "." + name, "$JS.API.CONSUMER.*." + stream + "." + name + ".>",
		"$JS.API.CONSUMER.*.*." + stream + "." + name}
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
// from environment variables (QUBESBUS_<ROLE>_PASSWORD), for deploy/nats, with the
// denials of PermissionsFor for the given hosts.
func Conf(hosts ...string) string {
	var b strings.Builder
	b.WriteString(`# Generated from cmd/qubesbus/internal/access (go run ./cmd/qubesbus setup --print-permissions):
# do not edit by hand. One NATS user per role; each may publish only its own subjects,
# in particular only the events it fires. Passwords come from the environment (never
# commit them): QUBESBUS_<ROLE>_PASSWORD.
#
# Event subjects: qubes.v1.<host>.events.<qube|_app>.<event>[.<suffix>], where an event
# "property-set:netvm" is the two tokens property-set.netvm.
#
# The audit trail (stream QUBES_AUDIT, subjects qubes.v1.<host>.audit): only the gateway
# publishes on it; the auditor role and the admin read it, the events role cannot.
#
# The durable consumers storage and devices keep on QUBES_EVENTS are named after their
# host, and only their owner may touch them: the deny lists name them for the hosts
# given (qubesbus setup --print-permissions --hosts local,other).

authorization {
  users = [
`)
	for i, r := range Roles {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "    # %s\n", r.About)
		fmt.Fprintf(&b, "    { user: %s, password: $QUBESBUS_%s_PASSWORD, permissions: {\n", r.Name, strings.ToUpper(r.Name))
		if deny := r.PermissionsFor(hosts).Publish.Deny; len(deny) > 0 {
			fmt.Fprintf(&b, "        publish:   { allow: %s,\n                     deny: %s }\n", list(r.publish()), list(deny))
		} else {
			fmt.Fprintf(&b, "        publish:   { allow: %s }\n", list(r.publish()))
		}
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
