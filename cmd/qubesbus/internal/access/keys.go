package access

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

// Keys are the nkeys of every role, one seed file per role (<dir>/<role>.nk, mode
// 0600, in a 0700 directory). The server knows only the public keys; a client proves
// its role by signing the server's nonce with the seed, so no secret crosses the bus.
type Keys struct {
	pubs map[string]string // role → public key
}

// SeedFile is where a role's seed is kept under dir.
func SeedFile(dir, role string) string { return filepath.Join(dir, role+".nk") }

// Ensure loads the seed of every role from dir, creating the directory and any
// missing seed first (on the first start of a host).
func Ensure(dir string) (*Keys, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nkeys dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nkeys dir: %w", err)
	}
	k := &Keys{pubs: map[string]string{}}
	for _, r := range Roles {
		pub, err := readPublic(SeedFile(dir, r.Name))
		if errors.Is(err, fs.ErrNotExist) {
			pub, err = create(SeedFile(dir, r.Name))
		}
		if err != nil {
			return nil, fmt.Errorf("nkey of %s: %w", r.Name, err)
		}
		k.pubs[r.Name] = pub
	}
	return k, nil
}

// ServerUsers are the server's users: every role's public key with its permissions
// on a server of the given hosts (Role.PermissionsFor).
func (k *Keys) ServerUsers(hosts ...string) []*server.NkeyUser {
	out := make([]*server.NkeyUser, 0, len(Roles))
	for _, r := range Roles {
		out = append(out, &server.NkeyUser{Nkey: k.pubs[r.Name], Permissions: r.PermissionsFor(hosts)})
	}
	return out
}

// readPublic reads a seed file and returns its public key. A file others may read is
// refused: it would let them act as the role.
func readPublic(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%s: mode %v, want 0600 (the seed is a secret)", path, st.Mode().Perm())
	}
	seed, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	kp, err := nkeys.FromSeed(trimSpace(seed))
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	defer kp.Wipe()
	return kp.PublicKey()
}

// create writes a new user seed to path (atomically, 0600) and returns its public key.
func create(path string) (string, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return "", err
	}
	defer kp.Wipe()
	seed, err := kp.Seed()
	if err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".nk-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return "", err
	}
	if _, err := tmp.Write(append(seed, '\n')); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", err
	}
	return kp.PublicKey()
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
