package qerr

import (
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

// constructors lists every constructor with its row; TestClassTable checks it covers
// the table and that each one is named after and builds its own class.
var constructors = map[class]func(string) *Error{
	cQubesException:                   QubesException,
	cProtocolError:                    ProtocolError,
	cPermissionDenied:                 PermissionDenied,
	cValueError:                       ValueError,
	cPropertyValueError:               PropertyValueError,
	cNoSuchPropertyError:              NoSuchPropertyError,
	cNotImplementedError:              NotImplementedError,
	cVMNotFoundError:                  VMNotFoundError,
	cVMInvalidUUIDError:               VMInvalidUUIDError,
	cVMAlreadyExistsError:             VMAlreadyExistsError,
	cVMError:                          VMError,
	cVMInUseError:                     VMInUseError,
	cVMNotStartedError:                VMNotStartedError,
	cVMNotRunningError:                VMNotRunningError,
	cVMNotPausedError:                 VMNotPausedError,
	cVMNotHaltedError:                 VMNotHaltedError,
	cVMShutdownTimeoutError:           VMShutdownTimeoutError,
	cMemoryError:                      MemoryError,
	cFeatureNotFoundError:             FeatureNotFoundError,
	cTagNotFoundError:                 TagNotFoundError,
	cInvalidTagError:                  InvalidTagError,
	cLabelNotFoundError:               LabelNotFoundError,
	cLabelInUseError:                  LabelInUseError,
	cInvalidLabelError:                InvalidLabelError,
	cInvalidLabelValueError:           InvalidLabelValueError,
	cPoolInUseError:                   PoolInUseError,
	cStoragePoolException:             StoragePoolException,
	cVolumeCopyTokenNotFoundError:     VolumeCopyTokenNotFoundError,
	cUnrecognizedDeviceAssignmentMode: UnrecognizedDeviceAssignmentMode,
	cDeviceNotAssigned:                DeviceNotAssigned,
	cDeviceNotFound:                   DeviceNotFound,
	cDeviceAlreadyAttached:            DeviceAlreadyAttached,
	cDeviceAlreadyAssigned:            DeviceAlreadyAssigned,
	cBackupProfileNotFoundError:       BackupProfileNotFoundError,
	cBackupAlreadyRunningError:        BackupAlreadyRunningError,
	cBackupCancelledError:             BackupCancelledError,
}

func TestClassTable(t *testing.T) {
	if len(constructors) != int(nClasses) || len(byName) != int(nClasses) {
		t.Fatalf("%d rows, %d constructors, %d distinct names", nClasses, len(constructors), len(byName))
	}
	for c := range nClasses {
		row := table[c]
		newErr := constructors[c]
		if row.name == "" || newErr == nil {
			t.Fatalf("row %d: name %q, constructor listed %v", c, row.name, newErr != nil)
		}
		fn := runtime.FuncForPC(reflect.ValueOf(newErr).Pointer()).Name()
		fn = fn[strings.LastIndexByte(fn, '.')+1:]
		if fn != row.name && "Qubes"+fn != row.name {
			t.Errorf("%s: constructor named %s", row.name, fn)
		}
		e := newErr("text")
		if e.Class != row.name {
			t.Errorf("%s() builds class %q, want %q", fn, e.Class, row.name)
		}
		if want := map[text]string{plain: "text", quoted: "'text'"}[row.text]; e.Message != want {
			t.Errorf("%s: message %q, want %q", row.name, e.Message, want)
		}
		if newErr("").Message != "" {
			t.Errorf("%s: empty argument gives message %q", row.name, newErr("").Message)
		}
		if AbortsAfter(e.Class) != (row.after == abort) {
			t.Errorf("%s: AbortsAfter = %v, table says %v", row.name, AbortsAfter(e.Class), row.after)
		}
		back := FromWire(e.Class, e.Message)
		if *back != *e || !errors.Is(fmt.Errorf("wrapped: %w", back), c.sentinel()) {
			t.Errorf("%s: wire round trip gives %v", row.name, back)
		}
		for d := range nClasses {
			if d != c && errors.Is(e, d.sentinel()) {
				t.Errorf("%s matches the sentinel of %s", row.name, table[d].name)
			}
		}
	}
}

// The classes qubesd aborts after (docs/spec/protocol.md §5) and the KeyError classes
// whose message is quoted (§6.3), as the recorded transcripts show them.
func TestClassBehaviour(t *testing.T) {
	for _, class := range []string{"ProtocolError", "PermissionDenied", "QubesInvalidTagError",
		"QubesInvalidLabelError", "QubesInvalidLabelValueError",
		"QubesUnrecognizedDeviceAssignmentMode", "QubesVolumeCopyTokenNotFoundError"} {
		if !AbortsAfter(class) {
			t.Errorf("%s closes cleanly", class)
		}
	}
	for _, class := range []string{"QubesException", "QubesValueError", "DeviceNotAssigned", "NoSuchClass"} {
		if AbortsAfter(class) {
			t.Errorf("%s aborts", class)
		}
	}
	if e := VolumeCopyTokenNotFoundError("Token to clone volume of qube was not found"); e.Message != "'Token to clone volume of qube was not found'" {
		t.Errorf("quoted message = %q", e.Message)
	}
	if e := FromWire("QubesFutureError", "x"); e.Class != "QubesFutureError" || e.Message != "x" {
		t.Errorf("unknown class from the wire = %+v", e)
	}
}

func TestSentinels(t *testing.T) {
	for _, tt := range []struct {
		sentinel *Error
		newErr   func(string) *Error
	}{
		{ErrProtocol, ProtocolError}, {ErrPermissionDenied, PermissionDenied}, {ErrVMNotFound, VMNotFoundError},
	} {
		if _, ok := byName[tt.sentinel.Class]; !ok || tt.sentinel.Message != "" {
			t.Errorf("sentinel %+v is not a table class", tt.sentinel)
		}
		if err := fmt.Errorf("op: %w", tt.newErr("msg")); !errors.Is(err, tt.sentinel) {
			t.Errorf("%v does not match sentinel %s", err, tt.sentinel.Class)
		}
	}
	// A class without a sentinel: its constructor's empty exception matches the class.
	for c := range nClasses {
		if err := fmt.Errorf("op: %w", c.new("msg")); !errors.Is(err, c.new("")) || errors.Is(err, ErrVMNotFound) != (c == cVMNotFoundError) {
			t.Errorf("%v: matched by class wrongly", err)
		}
	}
}

func TestCodes(t *testing.T) {
	errA, errB := errors.New("a"), errors.New("b")
	codes := Codes{{"code-a", errA}, {"code-b", errB}}
	for _, sentinel := range []error{errA, errB} {
		code := codes.Code(fmt.Errorf("refused: %w", sentinel))
		if code == "" || codes.Err(code) != sentinel {
			t.Errorf("%v: code %q comes back as %v", sentinel, code, codes.Err(code))
		}
	}
	if codes.Code(errors.New("other")) != "" || codes.Err("nope") != nil {
		t.Error("unknown error or code found in the table")
	}
}
