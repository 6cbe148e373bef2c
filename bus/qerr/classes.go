package qerr

// The exception classes qubesbus answers with: qubesd's classes that reach the client as
// a `2\0‹class›\0\0‹message›\0` frame (docs/spec/protocol.md §5, §6.3, §8). Each has
// one row in table and one constructor, named after the class without its "Qubes"
// prefix (ValueError builds QubesValueError; QubesException keeps its name). Services
// build exceptions only through the constructors, so no class name is spelled
// anywhere else.
//
// Classes that qubesd never answers with are not here: qubesd's unhandled exceptions
// (KeyError, ValueError, QubesVolumeNotFoundError, QubesPoolNotFoundError,
// QubesVolumeRevisionNotFoundError, …) abort the call with no response (use Abort), and
// QubesDaemonAccessError, QubesDaemonCommunicationError and QubesPropertyAccessError
// are raised by the client library itself. Nor are the classes qubesd has but no path
// of qubesbus raises (QubesVMNotSuspendedError, QubesNoTemplateError, …: events.md
// §5.2); an exception relayed from the wire keeps its class all the same (FromWire).

// class is a row of table.
type class uint8

// after is what qubesd does with the connection once the exception is written.
type after uint8

const (
	closes after = iota // half-close, then close: QubesException and its subclasses
	abort               // half-close, then abort: ProtocolError, PermissionDenied and their subclasses
)

// text is how a constructor's argument becomes the message, str(exception).
type text uint8

const (
	plain  text = iota // the argument as is
	quoted             // Python repr of the argument: subclasses of KeyError that keep its __str__
)

const (
	cQubesException class = iota
	cProtocolError
	cPermissionDenied

	cValueError
	cPropertyValueError
	cNoSuchPropertyError
	cNotImplementedError

	cVMNotFoundError
	cVMInvalidUUIDError
	cVMAlreadyExistsError
	cVMError
	cVMInUseError
	cVMNotStartedError
	cVMNotRunningError
	cVMNotPausedError
	cVMNotHaltedError
	cVMShutdownTimeoutError
	cMemoryError

	cFeatureNotFoundError
	cTagNotFoundError
	cInvalidTagError
	cLabelNotFoundError
	cLabelInUseError
	cInvalidLabelError
	cInvalidLabelValueError

	cPoolInUseError
	cStoragePoolException
	cVolumeCopyTokenNotFoundError

	cUnrecognizedDeviceAssignmentMode
	cDeviceNotAssigned
	cDeviceNotFound
	cDeviceAlreadyAttached
	cDeviceAlreadyAssigned

	cBackupProfileNotFoundError
	cBackupAlreadyRunningError
	cBackupCancelledError

	nClasses
)

// table is the one list of exception classes: the name on the wire (byte-exact), what
// happens to the connection after it, and how its message is rendered.
var table = [nClasses]struct {
	name  string
	after after
	text  text
}{
	cQubesException:   {"QubesException", closes, plain},
	cProtocolError:    {"ProtocolError", abort, plain},
	cPermissionDenied: {"PermissionDenied", abort, plain},

	cValueError:          {"QubesValueError", closes, plain},
	cPropertyValueError:  {"QubesPropertyValueError", closes, plain},
	cNoSuchPropertyError: {"QubesNoSuchPropertyError", closes, plain},
	cNotImplementedError: {"QubesNotImplementedError", closes, plain},

	cVMNotFoundError:        {"QubesVMNotFoundError", closes, plain},
	cVMInvalidUUIDError:     {"QubesVMInvalidUUIDError", closes, plain},
	cVMAlreadyExistsError:   {"QubesVMAlreadyExistsError", closes, plain},
	cVMError:                {"QubesVMError", closes, plain},
	cVMInUseError:           {"QubesVMInUseError", closes, plain},
	cVMNotStartedError:      {"QubesVMNotStartedError", closes, plain},
	cVMNotRunningError:      {"QubesVMNotRunningError", closes, plain},
	cVMNotPausedError:       {"QubesVMNotPausedError", closes, plain},
	cVMNotHaltedError:       {"QubesVMNotHaltedError", closes, plain},
	cVMShutdownTimeoutError: {"QubesVMShutdownTimeoutError", closes, plain},
	cMemoryError:            {"QubesMemoryError", closes, plain},

	cFeatureNotFoundError:   {"QubesFeatureNotFoundError", closes, plain},
	cTagNotFoundError:       {"QubesTagNotFoundError", closes, plain},
	cInvalidTagError:        {"QubesInvalidTagError", abort, plain},
	cLabelNotFoundError:     {"QubesLabelNotFoundError", closes, plain},
	cLabelInUseError:        {"QubesLabelInUseError", closes, plain},
	cInvalidLabelError:      {"QubesInvalidLabelError", abort, plain},
	cInvalidLabelValueError: {"QubesInvalidLabelValueError", abort, plain},

	cPoolInUseError:               {"QubesPoolInUseError", closes, plain},
	cStoragePoolException:         {"StoragePoolException", closes, plain},
	cVolumeCopyTokenNotFoundError: {"QubesVolumeCopyTokenNotFoundError", abort, quoted},

	cUnrecognizedDeviceAssignmentMode: {"QubesUnrecognizedDeviceAssignmentMode", abort, plain},
	cDeviceNotAssigned:                {"DeviceNotAssigned", closes, quoted},
	cDeviceNotFound:                   {"DeviceNotFound", closes, quoted},
	cDeviceAlreadyAttached:            {"DeviceAlreadyAttached", closes, quoted},
	cDeviceAlreadyAssigned:            {"DeviceAlreadyAssigned", closes, quoted},

	cBackupProfileNotFoundError: {"QubesBackupProfileNotFoundError", closes, plain},
	cBackupAlreadyRunningError:  {"BackupAlreadyRunningError", closes, plain},
	cBackupCancelledError:       {"BackupCancelledError", closes, plain},
}

// byName finds a row by its wire name.
var byName = func() map[string]class {
	m := make(map[string]class, nClasses)
	for c := range nClasses {
		m[table[c].name] = c
	}
	return m
}()

// new renders arg as str() of the class renders it: a quoted class shows a non-empty
// argument in repr quotes, and an exception raised without an argument has an empty
// message.
func (c class) new(arg string) *Error {
	if table[c].text == quoted && arg != "" {
		arg = Repr(arg)
	}
	return &Error{Class: table[c].name, Message: arg}
}

// sentinel matches every exception of the class with errors.Is.
func (c class) sentinel() *Error { return &Error{Class: table[c].name} }

// The constructors, one per row of table. The argument is the exception's argument
// (for most classes, the message itself).

func QubesException(msg string) *Error   { return cQubesException.new(msg) }
func ProtocolError(msg string) *Error    { return cProtocolError.new(msg) }
func PermissionDenied(msg string) *Error { return cPermissionDenied.new(msg) }

func ValueError(msg string) *Error          { return cValueError.new(msg) }
func PropertyValueError(msg string) *Error  { return cPropertyValueError.new(msg) }
func NoSuchPropertyError(msg string) *Error { return cNoSuchPropertyError.new(msg) }
func NotImplementedError(msg string) *Error { return cNotImplementedError.new(msg) }

func VMNotFoundError(msg string) *Error        { return cVMNotFoundError.new(msg) }
func VMInvalidUUIDError(msg string) *Error     { return cVMInvalidUUIDError.new(msg) }
func VMAlreadyExistsError(msg string) *Error   { return cVMAlreadyExistsError.new(msg) }
func VMError(msg string) *Error                { return cVMError.new(msg) }
func VMInUseError(msg string) *Error           { return cVMInUseError.new(msg) }
func VMNotStartedError(msg string) *Error      { return cVMNotStartedError.new(msg) }
func VMNotRunningError(msg string) *Error      { return cVMNotRunningError.new(msg) }
func VMNotPausedError(msg string) *Error       { return cVMNotPausedError.new(msg) }
func VMNotHaltedError(msg string) *Error       { return cVMNotHaltedError.new(msg) }
func VMShutdownTimeoutError(msg string) *Error { return cVMShutdownTimeoutError.new(msg) }
func MemoryError(msg string) *Error            { return cMemoryError.new(msg) }

func FeatureNotFoundError(msg string) *Error   { return cFeatureNotFoundError.new(msg) }
func TagNotFoundError(msg string) *Error       { return cTagNotFoundError.new(msg) }
func InvalidTagError(msg string) *Error        { return cInvalidTagError.new(msg) }
func LabelNotFoundError(msg string) *Error     { return cLabelNotFoundError.new(msg) }
func LabelInUseError(msg string) *Error        { return cLabelInUseError.new(msg) }
func InvalidLabelError(msg string) *Error      { return cInvalidLabelError.new(msg) }
func InvalidLabelValueError(msg string) *Error { return cInvalidLabelValueError.new(msg) }

func PoolInUseError(msg string) *Error       { return cPoolInUseError.new(msg) }
func StoragePoolException(msg string) *Error { return cStoragePoolException.new(msg) }

// VolumeCopyTokenNotFoundError shows its argument in repr quotes.
func VolumeCopyTokenNotFoundError(arg string) *Error {
	return cVolumeCopyTokenNotFoundError.new(arg)
}

func UnrecognizedDeviceAssignmentMode(msg string) *Error {
	return cUnrecognizedDeviceAssignmentMode.new(msg)
}

// The device exceptions show their argument in repr quotes.

func DeviceNotAssigned(arg string) *Error     { return cDeviceNotAssigned.new(arg) }
func DeviceNotFound(arg string) *Error        { return cDeviceNotFound.new(arg) }
func DeviceAlreadyAttached(arg string) *Error { return cDeviceAlreadyAttached.new(arg) }
func DeviceAlreadyAssigned(arg string) *Error { return cDeviceAlreadyAssigned.new(arg) }

func BackupProfileNotFoundError(msg string) *Error { return cBackupProfileNotFoundError.new(msg) }
func BackupAlreadyRunningError(msg string) *Error  { return cBackupAlreadyRunningError.new(msg) }
func BackupCancelledError(msg string) *Error       { return cBackupCancelledError.new(msg) }
