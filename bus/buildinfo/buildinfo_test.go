package buildinfo

import (
	"regexp"
	"testing"
)

// micro's own check of a service version (nats.go micro/service.go, semVerRegexp).
var semver = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

func TestVersionIsSemver(t *testing.T) {
	for _, tc := range []struct {
		in   Info
		want string
	}{
		{Info{Module: "v1.2.3"}, "1.2.3"},
		{Info{Module: "v0.4.0-rc.1"}, "0.4.0-rc.1"},
		{Info{Module: "(devel)"}, "0.0.0-dev"},
		{Info{Module: "(devel)", Revision: "9dff23e1c0ffee0123456789", Modified: true}, "0.0.0-dev+9dff23e1c0ff.dirty"},
		{Info{Module: "", Revision: "abc"}, "0.0.0-dev+abc"},
	} {
		got := tc.in.semver()
		if got != tc.want || !semver.MatchString(got) {
			t.Errorf("%+v: %q, want %q (semver)", tc.in, got, tc.want)
		}
	}
	if v := Version(); !semver.MatchString(v) {
		t.Errorf("Version() = %q, not a semantic version", v)
	}
}
