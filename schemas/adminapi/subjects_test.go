package adminapi

import (
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/bus/subject"
)

// Only registered names reach an API subject (the gateway sends any other to
// subject.UnknownMethod, the name itself in a header), so method tokens need no
// escaping or bounding: each is a short plain token.
func TestMethodSubjectsArePlainAndShort(t *testing.T) {
	for _, m := range Registry.Methods() {
		s := subject.ForHost("local").API(m.Name)
		for _, tok := range strings.Split(m.Name, ".") {
			if tok == "" || len(tok) > subject.MaxToken || subject.Token(tok) != tok {
				t.Errorf("method %q: token %q is not plain", m.Name, tok)
			}
		}
		if len(s) > 256 {
			t.Errorf("method %q: subject of %d bytes", m.Name, len(s))
		}
	}
}
