package envelope

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
)

// Headers of the causal marks. A reply carries the state its service was in after the
// call; the gateway keeps the highest marks it has seen and sends them with every
// later request, so a call never reads state older than what an earlier reply showed
// (read-your-writes across services and instances).
const (
	// HeaderConfigRev is a configuration revision (persistence's change log).
	HeaderConfigRev = "Qubes-Config-Rev"
	// HeaderRuntime is a lifecycle runtime mark, "<epoch>.<version>".
	HeaderRuntime = "Qubes-Runtime"
)

// RuntimeMark orders the runtime state of a host's lifecycle service. Epoch is the
// start time (Unix nanoseconds) of the instance that owns the hypervisor, so a newer
// owner's marks order after an older one's; Version counts that instance's runtime
// changes.
type RuntimeMark struct {
	Epoch   uint64
	Version uint64
}

// IsZero reports whether m is no mark at all.
func (m RuntimeMark) IsZero() bool { return m == RuntimeMark{} }

// Less reports whether m orders before o.
func (m RuntimeMark) Less(o RuntimeMark) bool {
	if m.Epoch != o.Epoch {
		return m.Epoch < o.Epoch
	}
	return m.Version < o.Version
}

// Max returns the later of m and o.
func (m RuntimeMark) Max(o RuntimeMark) RuntimeMark {
	if m.Less(o) {
		return o
	}
	return m
}

func (m RuntimeMark) String() string {
	return strconv.FormatUint(m.Epoch, 10) + "." + strconv.FormatUint(m.Version, 10)
}

// ParseRuntimeMark parses String's form; "" is the zero mark.
func ParseRuntimeMark(s string) (RuntimeMark, error) {
	if s == "" {
		return RuntimeMark{}, nil
	}
	e, v, ok := strings.Cut(s, ".")
	epoch, err1 := strconv.ParseUint(e, 10, 64)
	ver, err2 := strconv.ParseUint(v, 10, 64)
	if !ok || err1 != nil || err2 != nil {
		return RuntimeMark{}, fmt.Errorf("%w: runtime mark %q", ErrMalformed, s)
	}
	return RuntimeMark{Epoch: epoch, Version: ver}, nil
}

// Marks are the causal marks of a request or a reply; zero fields are absent.
type Marks struct {
	ConfigRev uint64
	Runtime   RuntimeMark
}

// Max returns the later of each mark.
func (m Marks) Max(o Marks) Marks {
	return Marks{ConfigRev: max(m.ConfigRev, o.ConfigRev), Runtime: m.Runtime.Max(o.Runtime)}
}

// Set writes the marks into h.
func (m Marks) Set(h nats.Header) {
	if m.ConfigRev != 0 {
		h.Set(HeaderConfigRev, strconv.FormatUint(m.ConfigRev, 10))
	}
	if !m.Runtime.IsZero() {
		h.Set(HeaderRuntime, m.Runtime.String())
	}
}

// ParseMarks reads the marks of h; absent headers are zero marks.
func ParseMarks(h nats.Header) (Marks, error) {
	var m Marks
	if s := h.Get(HeaderConfigRev); s != "" {
		rev, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return Marks{}, fmt.Errorf("%w: config revision %q", ErrMalformed, s)
		}
		m.ConfigRev = rev
	}
	rt, err := ParseRuntimeMark(h.Get(HeaderRuntime))
	if err != nil {
		return Marks{}, err
	}
	m.Runtime = rt
	return m, nil
}
