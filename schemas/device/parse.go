package device

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// ErrQarg is a device argument qubesd cannot split (it fails with an unhandled
// error: the call is aborted).
var ErrQarg = errors.New("malformed device argument")

// ParseQarg reads the qrexec form of a device, backend+port_id[+device_id…] (qubesd's
// VirtualDevice.from_qarg): "_" stands for "*", seven underscores for the unknown
// interface "?******", and an empty device id is Any. It does not check that the
// backend exists.
func ParseQarg(arg, class string) (Assignment, error) {
	backend, identity, ok := strings.Cut(arg, "+")
	if !ok {
		return Assignment{}, fmt.Errorf("%w: %q has no '+'", ErrQarg, arg)
	}
	if backend == "_" {
		backend = Any
	}
	port, devid, _ := strings.Cut(strings.ReplaceAll(identity, "+", ":"), ":")
	if port == "_" {
		port = Any
	}
	if devid == "_" {
		devid = Any
	}
	devid = strings.ReplaceAll(devid, "_______", unknownInterface)
	if devid == "" {
		devid = Any
	}
	return Assignment{Port: Port{Backend: backend, ID: port, Class: class}, DeviceID: devid, Mode: ModeManual}, nil
}

// ProtocolError is an error qubesd answers as ProtocolError with this text.
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return e.Msg }

func protocolf(format string, args ...any) error {
	return &ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

const keyChars = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&()*+,-./:;<>?@[\\]^_{|}~"

func checkChars(s string, value bool, msg string) error {
	var bad []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := strings.IndexByte(keyChars, c) >= 0 || value && (c >= 0x20 && c < 0x7f)
		if !ok && strings.IndexByte(string(bad), c) < 0 {
			bad = append(bad, c)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	parts := make([]string, len(bad))
	for i, c := range bad {
		parts[i] = pyRepr(string(c))
	}
	return protocolf("%s{%s}", msg, strings.Join(parts, ", "))
}

// unpack is qubesd's DeviceSerializer.unpack_properties: ordered properties, and the
// options (keys starting with "_", without it).
func unpack(payload []byte) (props []KV, opts []KV, err error) {
	for i, c := range payload {
		if c >= utf8.RuneSelf {
			return nil, nil, protocolf("'ascii' codec can't decode byte 0x%02x in position %d: ordinal not in range(128)", c, i)
		}
	}
	s := strings.Trim(string(payload), " \t\n\r\v\f\x1c\x1d\x1e\x1f")
	if s == "" {
		return nil, nil, nil
	}
	var keys, values []string
	key, rest, _ := strings.Cut(s, "='")
	key = strings.Trim(key, " \t\n\r\v\f\x1c\x1d\x1e\x1f")
	if err := checkChars(key, false, "Invalid chars in property name: "); err != nil {
		return nil, nil, err
	}
	keys = append(keys, key)
	for strings.Contains(rest, "='") {
		var valueKey string
		valueKey, rest, _ = strings.Cut(rest, "='")
		var value, k string
		if i := strings.LastIndex(valueKey, "' "); i >= 0 {
			value, k = valueKey[:i], valueKey[i+2:]
		} else {
			value, k = "", valueKey
		}
		value = strings.ReplaceAll(value, `\'`, "'")
		if err := checkChars(value, true, "Invalid chars in property value: "); err != nil {
			return nil, nil, err
		}
		values = append(values, value)
		k = strings.Trim(k, " \t\n\r\v\f\x1c\x1d\x1e\x1f")
		if err := checkChars(k, false, "Invalid chars in property name: "); err != nil {
			return nil, nil, err
		}
		keys = append(keys, k)
	}
	last := ""
	if rest != "" {
		last = rest[:len(rest)-1] // the closing quote
	}
	last = strings.ReplaceAll(last, `\'`, "'")
	if err := checkChars(last, true, "Invalid chars in property value: "); err != nil {
		return nil, nil, err
	}
	values = append(values, last)
	for i, k := range keys {
		if strings.HasPrefix(k, "_") {
			opts = setKV(opts, k[1:], values[i])
		} else {
			props = setKV(props, k, values[i])
		}
	}
	return props, opts, nil
}

// setKV is a Python dict assignment: a repeated key keeps its first place.
func setKV(kvs []KV, k, v string) []KV {
	for i := range kvs {
		if kvs[i].Key == k {
			kvs[i].Value = v
			return kvs
		}
	}
	return append(kvs, KV{k, v})
}

// ParseAssignment reads an Assign or Attach payload (qubesd's
// DeviceAssignment.deserialize) against the device the argument named. Every error
// is a *ProtocolError with qubesd's text. Frontend is checked by the caller (it must
// name a qube).
func ParseAssignment(payload []byte, expected Assignment) (Assignment, error) {
	props, opts, err := unpack(payload)
	if err != nil {
		return Assignment{}, err
	}
	get := func(k string) (string, bool) { return Option(props, k) }
	if v, ok := get("backend_domain"); ok && v != expected.Backend {
		return Assignment{}, protocolf("Got device exposed by %swhen expected devices from %s.", v, expected.Backend)
	}
	if v, ok := get("port_id"); ok && v != expected.Port.ID {
		return Assignment{}, protocolf("Got device from port: %s when expected port: %s.", v, expected.Port.ID)
	}
	if v, ok := get("devclass"); ok && v != expected.Class {
		return Assignment{}, protocolf("Got %s device when expected %s.", v, expected.Class)
	}
	a := expected
	a.Mode = ModeManual
	a.Options = opts
	if v, ok := get("device_id"); ok {
		if expected.DeviceID != Any && v != expected.DeviceID {
			return Assignment{}, protocolf("Unrecognized device identity '%s' expected '%s'", v, expected.DeviceID)
		}
		a.DeviceID = v
	}
	// Python reports an unexpected keyword argument before the constructor checks
	// the mode, and the mode before the frontend.
	for _, kv := range props {
		switch kv.Key {
		case "backend_domain", "port_id", "devclass", "device_id", "options", "device", "port", "mode", "frontend_domain":
		default:
			return Assignment{}, protocolf("DeviceAssignment.__init__() got an unexpected keyword argument %s", pyRepr(kv.Key))
		}
	}
	for _, kv := range props {
		switch kv.Key {
		case "mode":
			if !ValidMode(kv.Value) {
				return Assignment{}, protocolf("%s is not a valid AssignmentMode", pyRepr(kv.Value))
			}
			a.Mode = kv.Value
		case "frontend_domain":
			a.Frontend = kv.Value
		}
	}
	return a, nil
}

// ParseInterfaces splits concatenated 7-character interface codes (qubesd's
// DeviceInterface.from_str_bulk); the error is qubesd's QubesValueError text.
func ParseInterfaces(s string) ([]string, error) {
	if len(s)%7 != 0 {
		return nil, fmt.Errorf("Invalid length of interfaces=%s (is %d, expected multiple of 7)", pyRepr(s), len(s))
	}
	out := make([]string, 0, len(s)/7)
	for i := 0; i < len(s); i += 7 {
		out = append(out, s[i:i+7])
	}
	return out, nil
}
