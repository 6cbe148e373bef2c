package model

import (
	"slices"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

func sortStrings(s []string) { slices.Sort(s) }

// FindLabel validates a label name argument and looks it up.
func (m *Model) FindLabel(name string) (*config.Label, error) {
	if err := ValidateLabelName(name, false); err != nil {
		return nil, err
	}
	l := m.LookupLabel(name)
	if l == nil {
		return nil, LabelNotFound(name)
	}
	return l, nil
}

// pyWhitespace is what Python's str.strip() removes from ASCII text.
const pyWhitespace = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"

// LabelCreate plans admin.label.Create.
func (m *Model) LabelCreate(name string, payload []byte) (*Change, error) {
	if err := ValidateLabelName(name, true); err != nil {
		return nil, err
	}
	if !isASCII(payload) {
		return nil, qerr.InvalidLabelValueError("Label value must be encoded in ASCII")
	}
	color := strings.Trim(string(payload), pyWhitespace)
	switch {
	case len(color) != 8:
		return nil, qerr.InvalidLabelValueError("Label value must have length of 8")
	case !strings.HasPrefix(color, "0x"):
		return nil, qerr.InvalidLabelValueError("Label value must start with: 0x")
	case strings.Trim(color[2:], "0123456789abcdefABCDEF") != "":
		return nil, qerr.InvalidLabelValueError("Label value must only contain hexadecimal digits after prefix: 0123456789abcdefABCDEF")
	}
	if !XMLSafe(string(payload)) {
		// qubesd takes it (its check strips surrounding whitespace, \v and \f
		// included) and then cannot save qubes.xml any more; refused here instead.
		return nil, qerr.InvalidLabelValueError("Label value must not contain control characters")
	}
	if m.Label(name) != nil {
		return nil, qerr.LabelInUseError("Label is still in use: " + qerr.Repr(name))
	}
	index := 8
	for _, l := range m.C.Labels {
		index = max(index, l.Index)
	}
	// The colour is stored as sent, not stripped (qubesd does the same).
	l := config.Label{Index: index + 1, Color: string(payload), Name: name}
	return &Change{Ops: []config.Op{{Kind: config.OpAddLabel, Label: &l}}}, nil
}

// LabelRemove plans admin.label.Remove.
func (m *Model) LabelRemove(name string) (*Change, error) {
	l, err := m.FindLabel(name)
	if err != nil {
		return nil, err
	}
	if l.Index <= 8 {
		return nil, qerr.ProtocolError("Can only remove custom labels")
	}
	for i := range m.C.Domains {
		if v, ok := m.C.Domains[i].Property("label"); ok && v == l.Name {
			return nil, qerr.LabelInUseError("Label is still in use: Label(" +
				strconv.Itoa(l.Index) + ", " + qerr.Repr(l.Color) + ", " + qerr.Repr(l.Name) + ")")
		}
	}
	return &Change{Ops: []config.Op{{Kind: config.OpDelLabel, Name: l.Name}}}, nil
}
