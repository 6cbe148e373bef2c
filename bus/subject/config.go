package subject

// AllConfig matches the configuration change log of every host (Host.Config): the
// subjects of persistence's QUBES_CONFIG stream.
func AllConfig() string { return Prefix + ".*.config" }
