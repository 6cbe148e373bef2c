//go:build !unix

package checkpoint

import (
	"errors"
	"fmt"
)

// lock is unavailable without flock; qubesd itself only runs on Linux.
func (f File) lock() (func(), error) {
	return nil, fmt.Errorf("lock %s: %w", f.lockPath(), errors.ErrUnsupported)
}
