package subject

import "strings"

// Audit is the subject of the host's audit records (bus/audit): one subject per host,
// e.g. qubes.v1.local.audit. Only the gateway may publish on it (deploy/nats).
func (h Host) Audit() string { return Prefix + "." + h.id + ".audit" }

// AllAudit matches every host's audit records: the subjects of the QUBES_AUDIT stream.
func AllAudit() string { return Prefix + ".*.audit" }

// ParseAudit returns the host of an audit subject.
func ParseAudit(subj string) (host string, ok bool) {
	rest, found := strings.CutPrefix(subj, Prefix+".")
	if !found {
		return "", false
	}
	tok, found := strings.CutSuffix(rest, ".audit")
	if !found || tok == "" || strings.Contains(tok, ".") {
		return "", false
	}
	host, err := UnescapeToken(tok)
	return host, err == nil
}
