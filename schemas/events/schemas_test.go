package events

import "testing"

func TestValidateEventData(t *testing.T) {
	tests := []struct {
		name, data string
		ok         bool
	}{
		{"property-set:label", `{"name":"label","newvalue":"green","oldvalue":"red"}`, true},
		{"property-set:label", `{"name":"label","newvalue":"green"}`, true},
		{"property-set:label", `{"name":"label"}`, false},
		{"domain-start", `{"start_guid":"True"}`, true},
		{"domain-start", `{"start_guid":"True","extra":"x"}`, false},
		{"domain-add", `{"vm":1}`, false},
		{"domain-add", `{"vm":"caf\u00e9"}`, false},
		{"no-such-event", `{}`, false},
		{"connection-established", `{}`, true},
	}
	for _, tt := range tests {
		err := ValidateEventData(tt.name, []byte(tt.data))
		if (err == nil) != tt.ok {
			t.Errorf("%s %s: err = %v, want ok=%v", tt.name, tt.data, err, tt.ok)
		}
	}
}

func TestValidateHeaders(t *testing.T) {
	if err := ValidateHeaders("request", map[string][]string{"Qubes-Method": {"admin.vm.List"}, "Qubes-Source": {"dom0"}, "Qubes-Dest": {"a%20b"}}); err != nil {
		t.Error(err)
	}
	if err := ValidateHeaders("request", map[string][]string{"Qubes-Method": {"x y"}, "Qubes-Source": {"dom0"}, "Qubes-Dest": {"d"}}); err == nil {
		t.Error("raw space in a header accepted")
	}
	if err := ValidateHeaders("reply", map[string][]string{"Qubes-Status": {"exception"}}); err == nil {
		t.Error("exception without a class accepted")
	}
	if err := ValidateHeaders("reply", map[string][]string{"Qubes-Status": {"exception"}, "Qubes-Exception": {"QubesVMNotFoundError"}}); err != nil {
		t.Error(err)
	}
}
