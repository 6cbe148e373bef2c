package subject

// Audit is the subject of the host's audit records (bus/audit): one subject per host,
// e.g. qubes.v1.local.audit. Only the gateway may publish on it (deploy/nats).
func (h Host) Audit() string { return Prefix + "." + h.id + ".audit" }

// AllAudit matches every host's audit records: the subjects of the QUBES_AUDIT stream.
func AllAudit() string { return Prefix + ".*.audit" }
