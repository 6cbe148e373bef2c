package qerr

import (
	"errors"
	"fmt"
	"testing"
)

func TestIsMatchesClass(t *testing.T) {
	err := fmt.Errorf("start %q: %w", "work", VMNotFoundError("No such domain: 'work'"))
	if !errors.Is(err, ErrVMNotFound) {
		t.Fatal("wrapped QubesVMNotFoundError does not match its sentinel")
	}
	if errors.Is(err, ValueError("")) {
		t.Fatal("QubesVMNotFoundError matches QubesValueError")
	}
	var qe *Error
	if !errors.As(err, &qe) || qe.Message != "No such domain: 'work'" {
		t.Fatalf("errors.As = %v", qe)
	}
}

func TestAbort(t *testing.T) {
	err := Abort("write-once property")
	if !errors.Is(err, ErrAbort) {
		t.Fatal("Abort does not match ErrAbort")
	}
	if !AbortsAfter("ProtocolError") || AbortsAfter("QubesValueError") {
		t.Fatal("AbortsAfter classes wrong")
	}
}
