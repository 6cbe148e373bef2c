package subject

// AllConfig matches the configuration change log of every host (Host.Config): the
// subjects of persistence's QUBES_CONFIG stream.
func AllConfig() string { return Prefix + ".*.config" }

// ConfigSynced is where the host's persistence announces the revision its change log
// holds durably (after each group-commit sync); outside QUBES_CONFIG's subjects, so
// not stored.
func (h Host) ConfigSynced() string { return Prefix + "." + h.id + ".config.synced" }
