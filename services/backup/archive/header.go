// Package archive writes and reads Qubes OS backups in format version 4, as qubesd's
// qubes/backup.py writes them and qvm-backup-restore (qubesadmin/backup/restore.py)
// reads them.
//
// Layout. The archive is a sequence of POSIX tar archives, one per file (qubesd runs
// `tar -cO --posix` for each, so each ends with its end-of-archive blocks and is padded
// to a 10 240-byte record; readers use --ignore-zeros):
//
//	backup-header          key=value lines (version first)
//	backup-header.hmac     backup-header in the scrypt file format, passphrase "backup-header!<pass>"
//	qubes.xml.000.enc      the parts of each inner file, in order
//	vm5/private.img.000.enc
//	vm5/private.img.001.enc …
//
// An inner file (qubes.xml, vmN/<volume>.img, vmN/firewall.xml …) is a tar stream of
// that one file under its archive name, compressed whole when the header says so
// (gzip by default), split into parts of at most 100 MiB of that stream, and each part
// encrypted and authenticated in the scrypt file format with the passphrase
// "<backup-id>!<part name without .enc>!<pass>".
package archive

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Names of the archive's fixed files.
const (
	HeaderName     = "backup-header"
	HeaderHMACName = "backup-header.hmac"
	QubesXMLName   = "qubes.xml"
	// FormatVersion is the version this package writes and reads.
	FormatVersion = 4
	// DefaultChunkSize is qubesd's part size: 100 MiB of the compressed inner stream.
	DefaultChunkSize = 100 * 1024 * 1024
	// maxHeaderSize is restore.py's limit on backup-header and qubes.xml parts it
	// reads before the header is verified (HEADER_QUBES_XML_MAX_SIZE).
	maxHeaderSize = 1024 * 1024
)

// Header is the backup-header file.
type Header struct {
	Version           int
	Encrypted         bool
	Compressed        bool
	CompressionFilter string // "" omits the key
	HMACAlgorithm     string // "scrypt"
	BackupID          string
}

func pyBool(b bool) string {
	if b {
		return "True"
	}
	return "False"
}

// Marshal renders the header as qubesd's BackupHeader.save: version first, then the
// other keys in its order, a key whose value is unset omitted.
func (h Header) Marshal() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "version=%d\n", h.Version)
	fmt.Fprintf(&b, "encrypted=%s\n", pyBool(h.Encrypted))
	fmt.Fprintf(&b, "compressed=%s\n", pyBool(h.Compressed))
	if h.CompressionFilter != "" {
		fmt.Fprintf(&b, "compression-filter=%s\n", h.CompressionFilter)
	}
	if h.HMACAlgorithm != "" {
		fmt.Fprintf(&b, "hmac-algorithm=%s\n", h.HMACAlgorithm)
	}
	if h.BackupID != "" {
		fmt.Fprintf(&b, "backup-id=%s\n", h.BackupID)
	}
	return b.Bytes()
}

// ErrBadHeader reports a backup-header this package cannot use.
var ErrBadHeader = errors.New("invalid backup header")

// ParseHeader reads a backup-header as restore.py does: key=value lines, unknown keys
// ignored, version 4 requiring encrypted, hmac-algorithm scrypt and a backup-id.
func ParseHeader(data []byte) (Header, error) {
	var h Header
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return h, fmt.Errorf("%w: line %q", ErrBadHeader, line)
		}
		seen[key] = true
		switch key {
		case "version":
			v, err := strconv.Atoi(value)
			if err != nil {
				return h, fmt.Errorf("%w: version %q", ErrBadHeader, value)
			}
			h.Version = v
		case "encrypted", "compressed":
			if value != "True" && value != "False" {
				return h, fmt.Errorf("%w: %s %q", ErrBadHeader, key, value)
			}
			if key == "encrypted" {
				h.Encrypted = value == "True"
			} else {
				h.Compressed = value == "True"
			}
		case "compression-filter":
			h.CompressionFilter = value
		case "hmac-algorithm":
			h.HMACAlgorithm = value
		case "backup-id":
			h.BackupID = value
		}
	}
	if h.Version != FormatVersion {
		return h, fmt.Errorf("%w: version %d (want %d)", ErrBadHeader, h.Version, FormatVersion)
	}
	for _, k := range []string{"encrypted", "compressed", "hmac-algorithm", "backup-id"} {
		if !seen[k] {
			return h, fmt.Errorf("%w: missing %s", ErrBadHeader, k)
		}
	}
	if !h.Encrypted || h.HMACAlgorithm != "scrypt" {
		return h, fmt.Errorf("%w: version 4 is encrypted with scrypt", ErrBadHeader)
	}
	if strings.ContainsAny(h.BackupID, "!/\n") || h.BackupID == "" {
		return h, fmt.Errorf("%w: backup-id %q", ErrBadHeader, h.BackupID)
	}
	return h, nil
}

// PartPassphrase is the scrypt passphrase of an encrypted file of the archive:
// "backup-header!<pass>" for the header's HMAC, "<backup-id>!<part>!<pass>" for a part
// ("qubes.xml.000", "vm5/private.img.001": its name without ".enc").
func PartPassphrase(backupID, part string, passphrase []byte) []byte {
	var prefix string
	if part == HeaderName {
		prefix = HeaderName + "!"
	} else {
		prefix = backupID + "!" + part + "!"
	}
	return append([]byte(prefix), passphrase...)
}

// PartName is the archive name of part i of an inner file.
func PartName(inner string, i int) string { return fmt.Sprintf("%s.%03d", inner, i) }
