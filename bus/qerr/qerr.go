// Package qerr carries qubesd exceptions across the bus: the exception class name the
// client branches on and the exact message text, plus the "abort" outcome (qubesd's
// unhandled exceptions, which end the connection with no response at all).
package qerr

import (
	"errors"
	"fmt"
)

// Error is a qubesd exception: Class is the class name without module, Message the
// exact text of str(exception).
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

// New returns an exception of the given class with a message.
func New(class, msg string) *Error { return &Error{Class: class, Message: msg} }

// Newf formats the message.
func Newf(class, format string, args ...any) *Error {
	return &Error{Class: class, Message: fmt.Sprintf(format, args...)}
}

// Sentinels of the classes callers branch on. Compare with errors.Is.
var (
	ErrProtocol          = &Error{Class: "ProtocolError"}
	ErrPermissionDenied  = &Error{Class: "PermissionDenied"}
	ErrVMNotFound        = &Error{Class: "QubesVMNotFoundError"}
	ErrInvalidUUID       = &Error{Class: "QubesVMInvalidUUIDError"}
	ErrValue             = &Error{Class: "QubesValueError"}
	ErrPropertyValue     = &Error{Class: "QubesPropertyValueError"}
	ErrNoSuchProperty    = &Error{Class: "QubesNoSuchPropertyError"}
	ErrFeatureNotFound   = &Error{Class: "QubesFeatureNotFoundError"}
	ErrTagNotFound       = &Error{Class: "QubesTagNotFoundError"}
	ErrLabelNotFound     = &Error{Class: "QubesLabelNotFoundError"}
	ErrVMAlreadyExists   = &Error{Class: "QubesVMAlreadyExistsError"}
	ErrVMInUse           = &Error{Class: "QubesVMInUseError"}
	ErrVMNotStarted      = &Error{Class: "QubesVMNotStartedError"}
	ErrVMNotRunning      = &Error{Class: "QubesVMNotRunningError"}
	ErrVMNotPaused       = &Error{Class: "QubesVMNotPausedError"}
	ErrVMNotHalted       = &Error{Class: "QubesVMNotHaltedError"}
	ErrVMNotSuspended    = &Error{Class: "QubesVMNotSuspendedError"}
	ErrVMShutdownTimeout = &Error{Class: "QubesVMShutdownTimeoutError"}
	ErrMemory            = &Error{Class: "QubesMemoryError"}
	ErrNotImplemented    = &Error{Class: "QubesNotImplementedError"}
	ErrQubes             = &Error{Class: "QubesException"}
)

// Protocol returns a ProtocolError with the given text.
func Protocol(msg string) *Error { return New("ProtocolError", msg) }

// abortsAfter lists the classes that qubesd answers and then aborts the connection
// (ProtocolError, PermissionDenied and their subclasses) instead of closing it cleanly.
var abortsAfter = map[string]bool{
	"ProtocolError":                         true,
	"PermissionDenied":                      true,
	"QubesInvalidTagError":                  true,
	"QubesInvalidLabelError":                true,
	"QubesInvalidLabelValueError":           true,
	"QubesUnrecognizedDeviceAssignmentMode": true,
	"QubesVolumeCopyTokenNotFoundError":     true,
}

// AbortsAfter reports whether the connection is aborted after this class is answered.
func AbortsAfter(class string) bool { return abortsAfter[class] }

// ErrAbort is the outcome of qubesd's unhandled exceptions: the connection is closed
// with no response. Wrap it with the cause: fmt.Errorf("%w: %w", qerr.ErrAbort, err).
var ErrAbort = errors.New("call aborted without a response")

// Abort wraps a cause as an aborted call.
func Abort(cause string) error { return fmt.Errorf("%w: %s", ErrAbort, cause) }
