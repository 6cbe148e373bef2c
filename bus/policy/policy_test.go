package policy

import (
	"errors"
	"strings"
	"testing"
)

var (
	dom0 = Qube{Name: "dom0", Class: "AdminVM"}
	work = Qube{Name: "work", Class: "AppVM", Tags: []string{"ops"}}
	net  = Qube{Name: "sys-net", Class: "AppVM"}
	tmpl = Qube{Name: "fedora-41", Class: "TemplateVM"}
)

const rules = `
# method                 argument  source    target     action
admin.vm.List            *         work      @adminvm   allow
admin.vm.property.Get    +label    @tag:ops  @anyvm     allow
admin.vm.property.Get    *         work      work       deny
admin.vm.feature.*       *         @anyvm    @type:TemplateVM allow
admin.vm.Start           +         sys-net   sys-net    allow
admin.*                  *         sys-net   @anyvm     deny
admin.vm.Kill            *         @adminvm  work       deny
`

func TestDecide(t *testing.T) {
	p, err := Parse(strings.NewReader(rules))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		method   string
		arg      string
		src, dst Qube
		want     Action
		line     int // 0: the default decided
	}{
		{"allowed list", "admin.vm.List", "", work, dom0, Allow, 3},
		{"tag and argument", "admin.vm.property.Get", "label", work, net, Allow, 4},
		{"first match wins over a later deny", "admin.vm.property.Get", "label", work, work, Allow, 4},
		{"other argument denied", "admin.vm.property.Get", "netvm", work, work, Deny, 5},
		{"prefix method and type target", "admin.vm.feature.Get", "x", net, tmpl, Allow, 6},
		{"empty argument", "admin.vm.Start", "", net, net, Allow, 7},
		{"explicit deny", "admin.vm.List", "", net, dom0, Deny, 8},
		{"dom0 can be denied too", "admin.vm.Kill", "", dom0, work, Deny, 9},
		{"default allows dom0", "admin.vm.Remove", "", dom0, work, Allow, 0},
		{"default denies others", "admin.vm.Remove", "", work, work, Deny, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, rule := p.Decide(tt.method, tt.arg, tt.src, tt.dst)
			line := 0
			if rule != nil {
				line = rule.Line
			}
			if got != tt.want || line != tt.line {
				t.Fatalf("got %v by line %d, want %v by line %d", got, line, tt.want, tt.line)
			}
		})
	}
	var none *Policy
	if got, _ := none.Decide("admin.vm.List", "", work, dom0); got != Deny {
		t.Fatal("no policy: non-dom0 source allowed")
	}
}

func TestParseErrors(t *testing.T) {
	for _, bad := range []string{
		"admin.vm.List * work dom0",
		"admin.vm.List * work dom0 maybe",
		"admin.vm.List label work dom0 allow",
		"admin.*.List * work dom0 allow",
		"admin.vm.List * @bogus dom0 allow",
	} {
		if _, err := Parse(strings.NewReader("# ok\n" + bad)); !errors.Is(err, ErrSyntax) || !strings.Contains(err.Error(), "line 2") {
			t.Errorf("%q: err = %v", bad, err)
		}
	}
}
