package configstore

import (
	"errors"
	"fmt"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// A refused mutation's config error survives the reply: ReplyFor names it in Kind and
// the client side gets the same sentinel back.
func TestInvalidKindsRoundTrip(t *testing.T) {
	for _, sentinel := range []error{config.ErrNoSuchDomain, config.ErrDuplicate, config.ErrDanglingRef, config.ErrBadOp} {
		rep := ReplyFor(0, fmt.Errorf("apply: %w", sentinel))
		if rep.Code != CodeInvalid || rep.Kind == "" {
			t.Fatalf("%v: reply %+v", sentinel, rep)
		}
		if back := invalidKinds.Err(rep.Kind); !errors.Is(back, sentinel) {
			t.Errorf("%v: kind %q comes back as %v", sentinel, rep.Kind, back)
		}
	}
	if rep := ReplyFor(0, config.ErrBadOp); rep.Kind != KindBadOp {
		t.Errorf("bad op kind = %q", rep.Kind)
	}
	if rep := ReplyFor(0, errors.New("other")); rep.Code != CodeInvalid || rep.Kind != "" {
		t.Errorf("unclassified error: reply %+v", rep)
	}
}
