package model

import (
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

const fixture = "../../testdata/qubes.xml"

func loadFixture(t testing.TB) *config.Config {
	t.Helper()
	c, err := qubesxml.Load(fixture)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func holder(t testing.TB, m *Model, vm string) Holder {
	t.Helper()
	if vm == "" {
		return Global
	}
	h, err := m.Holder(vm)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// errText renders an outcome as "Class: message", "abort" or "".
func errText(err error) string {
	if err == nil {
		return ""
	}
	if errors.Is(err, qerr.ErrAbort) {
		return "abort"
	}
	var qe *qerr.Error
	if errors.As(err, &qe) {
		return qe.Class + ": " + qe.Message
	}
	return "other: " + err.Error()
}

// apply applies a change to c (as persistence would) and fails the test on error.
func apply(t testing.TB, c *config.Config, ch *Change) {
	t.Helper()
	if err := config.Apply(c, ch.Ops); err != nil {
		t.Fatalf("apply %+v: %v", ch.Ops, err)
	}
}
