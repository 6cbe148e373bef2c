package rpc

import (
	"context"
	"errors"
	"regexp"
	"strings"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
)

// Ref is a resolved qube: what the checks and handlers need to know of it.
type Ref struct {
	Name  string
	Class string
	UUID  string
	Tags  []string // for access policy; shared, never modified
}

// IsAdminVM reports whether the qube is the admin VM (dom0).
func (r Ref) IsAdminVM() bool { return r.Class == "AdminVM" }

// Resolver finds a qube by exact name or by UUID. It returns a *qerr.Error of class
// QubesVMNotFoundError (errors.Is qerr.ErrVMNotFound) when there is none; the message
// is filled in by the checks.
type Resolver interface {
	ResolveName(ctx context.Context, name string) (Ref, error)
	ResolveUUID(ctx context.Context, uuid string) (Ref, error)
}

// Call is a request that passed every check qubesd runs before a handler.
type Call struct {
	Method  Method
	Source  Ref
	Dest    Ref
	Arg     string
	Payload []byte
	ID      string
	// After are the marks of the newest state the caller has seen (envelope.Marks).
	After envelope.Marks
}

var uuidForm = regexp.MustCompile(`^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$`)

// resolve decodes a source or destination reference (docs/spec/protocol.md §3).
func resolve(ctx context.Context, res Resolver, text string) (Ref, error) {
	if !isASCII(text) {
		return Ref{}, qerr.Abort("non-ASCII qube reference")
	}
	var ref Ref
	var err error
	if rest, ok := strings.CutPrefix(text, "uuid:"); ok {
		if !uuidForm.MatchString(rest) {
			return Ref{}, qerr.VMInvalidUUIDError("VM UUID is not valid: " + qerr.Repr(rest))
		}
		ref, err = res.ResolveUUID(ctx, rest)
	} else {
		ref, err = res.ResolveName(ctx, text)
	}
	if err != nil {
		if errors.Is(err, qerr.ErrVMNotFound) {
			return Ref{}, qerr.VMNotFoundError("No such domain: " + qerr.Repr(text))
		}
		return Ref{}, err
	}
	return ref, nil
}

// Authorizer decides whether a source may call a method on a destination (qubesd's
// admin-permission check, which qrexec policy drives on a real system).
type Authorizer interface {
	Allowed(method, arg string, src, dest Ref) bool
}

// Check runs qubesd's pre-handler pipeline (docs/spec/protocol.md §2.2) in its order;
// the first failure wins. m is nil for a method that is not registered. auth, if not
// nil, runs last: a denied call answers PermissionDenied with no message.
func Check(ctx context.Context, res Resolver, auth Authorizer, m *Method, req *envelope.Request) (*Call, error) {
	src, err := resolve(ctx, res, req.Source)
	if err != nil {
		return nil, err
	}
	dest, err := resolve(ctx, res, req.Dest)
	if err != nil {
		return nil, err
	}
	if !isASCII(req.Arg) || !isASCII(req.Method) {
		return nil, qerr.Abort("non-ASCII method or argument")
	}
	if m == nil || m.Name != req.Method {
		return nil, qerr.ProtocolError("no such method: " + qerr.Repr(req.Method))
	}
	switch {
	case m.Payload == Required && len(req.Payload) == 0:
		return nil, qerr.ProtocolError("expected payload")
	case m.Payload == Forbidden && len(req.Payload) != 0:
		return nil, qerr.ProtocolError("unexpected payload")
	}
	switch {
	case m.Arg == Required && req.Arg == "":
		return nil, qerr.ProtocolError("expected an argument")
	case m.Arg == Forbidden && req.Arg != "":
		return nil, qerr.ProtocolError("unexpected argument")
	}
	switch {
	case m.Dest == AdminVMDest && !dest.IsAdminVM():
		return nil, qerr.ProtocolError("expected destination to be AdminVM")
	case m.Dest == NotAdminVMDest && dest.IsAdminVM():
		return nil, qerr.ProtocolError("expected destination to not be AdminVM")
	}
	if auth != nil && !auth.Allowed(m.Name, req.Arg, src, dest) {
		return nil, qerr.PermissionDenied("")
	}
	return &Call{Method: *m, Source: src, Dest: dest, Arg: req.Arg, Payload: req.Payload, ID: req.ID, After: req.After}, nil
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
