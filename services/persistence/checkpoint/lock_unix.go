//go:build unix

package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// lock takes the exclusive flock on qubes.xml.lock, waiting for another holder. The
// kernel drops it when the holder dies, so a killed instance never leaves it held. The
// lock file is never removed: removing it would let two processes lock two inodes.
func (f File) lock() (unlock func(), err error) {
	lf, err := os.OpenFile(f.lockPath(), os.O_RDWR|os.O_CREATE, 0o660)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	for {
		err = syscall.Flock(int(lf.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		lf.Close()
		return nil, fmt.Errorf("lock %s: %w", f.lockPath(), err)
	}
	return func() {
		_ = syscall.Flock(int(lf.Fd()), syscall.LOCK_UN)
		lf.Close()
	}, nil
}
