package firewall

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		line string
		want string // API text; "" means the rule is refused
	}{
		{"accept", "action=accept", "action=accept"},
		{"host https", "action=accept proto=tcp dsthost=qubes-os.org dstports=443-443", "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443"},
		{"single port", "action=accept proto=udp dstports=53", "action=accept proto=udp dstports=53-53"},
		{"port plus sign", "action=accept proto=udp dstports=+53", "action=accept proto=udp dstports=53-53"},
		{"dns", "action=accept specialtarget=dns", "action=accept specialtarget=dns"},
		{"icmp", "action=drop proto=icmp icmptype=8", "action=drop proto=icmp icmptype=8"},
		{"icmp leading zero", "action=drop proto=icmp icmptype=08", "action=drop proto=icmp icmptype=8"},
		{"cidr4", "action=accept dsthost=10.0.0.0/8", "action=accept dst4=10.0.0.0/8"},
		{"bare ip4", "action=accept dst4=1.2.3.4", "action=accept dst4=1.2.3.4/32"},
		{"bare ip6", "action=accept dst6=fd00::1", "action=accept dst6=fd00::1/128"},
		{"cidr6", "action=accept dst6=fd00::/8", "action=accept dst6=fd00::/8"},
		{"type follows value", "action=accept dst4=fd00::/8", "action=accept dst6=fd00::/8"},
		{"dstname", "action=accept dstname=example.com", "action=accept dsthost=example.com"},
		{"empty host", "action=accept dsthost=", "action=accept dsthost="},
		{"comment with spaces", "action=accept dsthost=example.com comment=hello world", "action=accept dsthost=example.com comment=hello world"},
		{"empty comment", "action=accept comment=", "action=accept"},
		{"expire", "action=accept expire=4102444800", "action=accept expire=4102444800"},
		{"order", "proto=tcp dstports=1-2 expire=4102444800 action=drop specialtarget=dns dsthost=a.b comment=c", "action=drop expire=4102444800 dsthost=a.b proto=tcp specialtarget=dns dstports=1-2 comment=c"},
		{"surrounding spaces", "  action=accept  ", "action=accept"},
		{"tab stripped", "\taction=accept\t", "action=accept"},

		{"bad action", "action=allow", ""},
		{"no action", "proto=tcp", ""},
		{"bad host", "action=accept dsthost=bad_host!", ""},
		{"upper-case host", "action=accept dsthost=Example.com", ""},
		{"bad proto", "action=accept proto=sctp", ""},
		{"ports without proto", "action=accept dstports=80", ""},
		{"ports with icmp", "action=accept proto=icmp dstports=80", ""},
		{"port too big", "action=accept proto=tcp dstports=99999", ""},
		{"port range reversed", "action=accept proto=tcp dstports=443-80", ""},
		{"port double dash", "action=accept proto=tcp dstports=1-2-3", ""},
		{"negative port", "action=accept proto=tcp dstports=-5", ""},
		{"icmptype with tcp", "action=accept proto=tcp icmptype=8", ""},
		{"icmptype too big", "action=accept proto=icmp icmptype=256", ""},
		{"icmptype four digits", "action=accept proto=icmp icmptype=0008", ""},
		{"bad special target", "action=accept specialtarget=ntp", ""},
		{"duplicate key", "action=accept action=drop", ""},
		{"two destinations", "action=accept dst4=1.2.3.4 dsthost=a.b", ""},
		{"two dst4", "action=accept dst4=1.2.3.4 dst4=1.2.3.5", ""},
		{"unknown key", "action=accept color=red", ""},
		{"no equals", "accept", ""},
		{"xml", `<rule action="accept"/>`, ""},
		{"comment not last", "action=accept comment=x proto=tcp", ""},
		{"bad expire", "action=accept expire=soon", ""},
		{"expire beyond year 9999", "action=accept expire=253402300800", ""},
		{"empty line", "", ""},
		{"only comment", "comment=x", ""},
		{"double space", "action=accept  proto=tcp", ""},
		{"prefix too long", "action=accept dsthost=10.0.0.0/33", ""},
		{"prefix6 too long", "action=accept dsthost=fd00::/129", ""},
		{"bad prefix", "action=accept dsthost=10.0.0.0/x", ""},
		{"too many slashes", "action=accept dsthost=10.0.0.0/8/8", ""},
		{"leading zero ip is a host name", "action=accept dsthost=10.0.0.01", "action=accept dsthost=10.0.0.01"},
		{"three dots cidr", "action=accept dsthost=10.0.0/8", ""},
		{"ip6 zone", "action=accept dsthost=fe80::1%eth0", ""},
		{"strange comment", "action=accept comment=a=b", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Parse(tt.line)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %q, want an error", tt.line, r.API())
				}
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Parse(%q) error %v does not wrap ErrInvalid", tt.line, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.line, err)
			}
			if got := r.API(); got != tt.want {
				t.Fatalf("Parse(%q).API() = %q, want %q", tt.line, got, tt.want)
			}
			// What Get prints parses back to the same rule.
			again, err := Parse(r.API())
			if err != nil || again != r {
				t.Fatalf("reparse of %q = %+v, %v; want %+v", r.API(), again, err, r)
			}
		})
	}
}

func TestParseRulesSplitsLinesAsPython(t *testing.T) {
	rules, err := ParseRules("action=accept specialtarget=dns\r\naction=drop\x0baction=accept\n")
	if err != nil || len(rules) != 3 {
		t.Fatalf("ParseRules = %v, %v; want 3 rules", rules, err)
	}
	if _, err := ParseRules("action=accept\n\naction=drop\n"); err == nil {
		t.Fatal("an empty line must fail the set")
	}
}

func TestXMLRoundTrip(t *testing.T) {
	rules, err := ParseRules("action=accept dsthost=qubes-os.org proto=tcp dstports=443 comment=web site\naction=accept specialtarget=dns\naction=drop proto=icmp icmptype=8\naction=drop expire=4102444800\n")
	if err != nil {
		t.Fatal(err)
	}
	want := `<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="comment">web site</property>
        <property name="dsthost">qubes-os.org</property>
        <property name="proto">tcp</property>
        <property name="dstports">443</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="specialtarget">dns</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="proto">icmp</property>
        <property name="icmptype">8</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="expire">4102444800</property>
      </properties>
    </rule>
  </rules>
</firewall>
`
	got := Marshal(rules)
	if string(got) != want {
		t.Fatalf("Marshal =\n%s\nwant\n%s", got, want)
	}
	back, err := Unmarshal(got)
	if err != nil {
		t.Fatal(err)
	}
	if len(back) != len(rules) {
		t.Fatalf("Unmarshal: %d rules, want %d", len(back), len(rules))
	}
	for i := range rules {
		if back[i] != rules[i] {
			t.Errorf("rule %d: %+v, want %+v", i, back[i], rules[i])
		}
	}
	if string(Marshal(nil)) != "<firewall version=\"2\">\n  <rules/>\n</firewall>\n" {
		t.Errorf("empty rules: %q", Marshal(nil))
	}
	if _, err := Unmarshal([]byte(`<firewall version="1" policy="allow"/>`)); err == nil {
		t.Error("version 1 must be refused")
	}
}

func TestExpiry(t *testing.T) {
	rules, err := ParseRules("action=accept expire=1000\naction=drop expire=3000\naction=accept dst6=fd00::/8\naction=drop\n")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(2000, 0)
	if got, want := Get(rules, now), "action=drop expire=3000\naction=accept dst6=fd00::/8\naction=drop\n"; got != want {
		t.Errorf("Get = %q, want %q", got, want)
	}
	db := QubesDB(rules, 4, now)
	want := map[string]string{"policy": "drop", "0001": "action=drop", "0003": "action=drop"}
	if len(db) != len(want) {
		t.Fatalf("QubesDB = %v, want %v", db, want)
	}
	for k, v := range want {
		if db[k] != v {
			t.Errorf("QubesDB[%s] = %q, want %q", k, db[k], v)
		}
	}
	if got := QubesDB(rules, 6, now)["0002"]; got != "action=accept dst6=fd00::/8" {
		t.Errorf("QubesDB v6 0002 = %q", got)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"action=accept", "action=accept proto=tcp dsthost=qubes-os.org dstports=443-443",
		"action=drop proto=icmp icmptype=8 comment=x y", "action=accept dst6=fd00::/8 expire=1700000000", "accept"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		r, err := Parse(line)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if r.Action != "accept" && r.Action != "drop" {
			t.Fatalf("accepted action %q", r.Action)
		}
		api := r.API()
		if strings.ContainsAny(api, "\n\r") {
			t.Fatalf("API text %q holds a line break", api)
		}
		again, err := Parse(api)
		if err != nil || again != r {
			t.Fatalf("API text %q parses to %+v, %v; want %+v", api, again, err, r)
		}
		back, err := Unmarshal(Marshal([]Rule{r}))
		if err != nil || len(back) != 1 || back[0] != r {
			t.Fatalf("XML round trip of %+v = %+v, %v", r, back, err)
		}
	})
}
