// Package qerr carries qubesd exceptions across the bus: the exception class name the
// client branches on and the exact message text, plus the "abort" outcome (qubesd's
// unhandled exceptions, which end the connection with no response at all).
package qerr

import (
	"errors"
	"fmt"
)

// Error is a qubesd exception: Class is the class name without module, Message the
// exact text of str(exception). Services build one with its class's constructor
// (ValueError, VMNotFoundError, …: see classes.go); FromWire rebuilds one from a reply.
type Error struct {
	Class   string
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Class
	}
	return e.Class + ": " + e.Message
}

// Is matches errors of the same class, so a sentinel such as ErrVMNotFound matches every
// QubesVMNotFoundError whatever its message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Class == e.Class && (t.Message == "" || t.Message == e.Message)
}

// FromWire is an exception as it arrived in a reply: the class name and message are
// kept verbatim, whether or not the class is in the table (a newer service may answer
// with a class this build does not know).
func FromWire(class, msg string) *Error { return &Error{Class: class, Message: msg} }

// AbortsAfter reports whether qubesd aborts the connection after answering this class
// instead of closing it cleanly. Classes outside the table close cleanly.
func AbortsAfter(class string) bool {
	c, ok := byName[class]
	return ok && table[c].after == abort
}

// Sentinels of the classes the code branches on. Compare with errors.Is; any class's
// constructor with an empty argument matches its class the same way
// (errors.Is(err, qerr.ValueError(""))).
var (
	ErrProtocol         = cProtocolError.sentinel()
	ErrPermissionDenied = cPermissionDenied.sentinel()
	ErrVMNotFound       = cVMNotFoundError.sentinel()
)

// ErrAbort is the outcome of qubesd's unhandled exceptions: the connection is closed
// with no response. Wrap it with the cause: fmt.Errorf("%w: %w", qerr.ErrAbort, err).
var ErrAbort = errors.New("call aborted without a response")

// Abort wraps a cause as an aborted call.
func Abort(cause string) error { return fmt.Errorf("%w: %s", ErrAbort, cause) }
