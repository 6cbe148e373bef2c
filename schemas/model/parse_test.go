package model

import "testing"

func TestParseInt(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"5", 5, true}, {" 5 ", 5, true}, {"+3", 3, true}, {"-7", -7, true}, {"1_0", 10, true},
		{"0005", 5, true}, {"\t\n12\r\x0b\x0c", 12, true}, {"9223372036854775807", 1<<63 - 1, true},
		{"-9223372036854775808", -1 << 63, true},
		{"", 0, false}, {" ", 0, false}, {"1e3", 0, false}, {"four", 0, false}, {"_1", 0, false},
		{"1_", 0, false}, {"1__0", 0, false}, {"+-1", 0, false}, {"+ 1", 0, false}, {"\x1c5", 0, false},
		{"0x10", 0, false}, {"9223372036854775808", 0, false}, {"1.0", 0, false},
	} {
		got, ok := ParseInt(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseInt(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestParseBool(t *testing.T) {
	for _, in := range []string{"1", "yes", "TRUE", "On", "true"} {
		if b, err := ParseBool(in); err != nil || !b {
			t.Errorf("ParseBool(%q) = %v, %v", in, b, err)
		}
	}
	for _, in := range []string{"0", "no", "False", "OFF"} {
		if b, err := ParseBool(in); err != nil || b {
			t.Errorf("ParseBool(%q) = %v, %v", in, b, err)
		}
	}
	for in, want := range map[string]string{
		"maybe": "QubesValueError: Invalid literal for boolean property: 'maybe'",
		"":      "QubesValueError: Invalid literal for boolean property: ''",
		" true": "QubesValueError: Invalid literal for boolean property: ' true'",
		"it's":  `QubesValueError: Invalid literal for boolean property: "it's"`,
	} {
		if _, err := ParseBool(in); errText(err) != want {
			t.Errorf("ParseBool(%q): %s, want %s", in, errText(err), want)
		}
	}
}

func TestParseAddresses(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"10.137.0.5", "10.137.0.5", true}, {"01.2.3.4", "", false}, {" 1.2.3.4", "", false},
		{"1.2.3", "", false}, {"256.1.1.1", "", false}, {"::1", "", false},
	} {
		got, ok := ParseIPv4(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseIPv4(%q) = %q, %v", tc.in, got, ok)
		}
	}
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"::1", "::1", true}, {"0:0:0:0:0:0:0:1", "::1", true}, {"1:0:0:2:0:0:0:3", "1:0:0:2::3", true},
		{"FD09:24EF::A89:5", "fd09:24ef::a89:5", true}, {"::ffff:1.2.3.4", "::ffff:1.2.3.4", true},
		{"fe80::1%eth0", "fe80::1%eth0", true}, {"fe80::1%", "", false}, {"fe80::1%a%b", "", false},
		{"fe80::1%\n", "", false}, {"1.2.3.4", "", false}, {"00001::1", "", false}, {"", "", false},
	} {
		got, ok := ParseIPv6(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseIPv6(%q) = %q, %v", tc.in, got, ok)
		}
	}
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"{12345678-1234-5678-1234-567812345678}", "12345678-1234-5678-1234-567812345678", true},
		{"urn:uuid:12345678123456781234567812345678", "12345678-1234-5678-1234-567812345678", true},
		{"ABCDEF00-0000-0000-0000-000000000000", "abcdef00-0000-0000-0000-000000000000", true},
		{"12345678-1234-5678-1234-56781234567", "", false}, {"g2345678123456781234567812345678", "", false},
	} {
		got, ok := ParseUUID(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseUUID(%q) = %q, %v", tc.in, got, ok)
		}
	}
}

func TestValidateName(t *testing.T) {
	for in, want := range map[string]string{
		"work":                             "",
		"a.b_c-d9":                         "",
		"":                                 "QubesValueError: VM name contains illegal characters",
		"1abc":                             "QubesValueError: VM name cannot start with hyphen, underscore, dot or numbers",
		"-x":                               "QubesValueError: VM name cannot start with hyphen, underscore, dot or numbers",
		"a b":                              "QubesValueError: VM name contains illegal characters",
		"work\n":                           "QubesValueError: VM name contains illegal characters",
		"Domain-0":                         "QubesValueError: VM name cannot be 'Domain-0'",
		"none":                             "QubesValueError: VM name cannot be 'none' nor 'default'",
		"default":                          "QubesValueError: VM name cannot be 'none' nor 'default'",
		"sys-dm":                           "QubesValueError: VM name cannot end with -dm",
		"abcdefghijabcdefghijabcdefghijab": "QubesValueError: VM name must be shorter than 32 characters",
	} {
		if got := errText(ValidateName(in)); got != want {
			t.Errorf("ValidateName(%q) = %s, want %s", in, got, want)
		}
	}
}
