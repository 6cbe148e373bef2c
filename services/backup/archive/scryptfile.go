package archive

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"

	"golang.org/x/crypto/scrypt"
)

// The scrypt file format, as the tarsnap scrypt tool (scryptenc.c) defines it and as
// `scrypt enc` writes every encrypted file of a Qubes backup:
//
//	offset length
//	0      6      "scrypt"
//	6      1      format version (0)
//	7      1      log2(N)
//	8      4      r (big-endian)
//	12     4      p (big-endian)
//	16     32     salt
//	48     16     first 16 bytes of SHA-256(bytes 0..47)
//	64     32     HMAC-SHA256(bytes 0..63)
//	96     X      data XOR the AES-256-CTR key stream (nonce 0)
//	96+X   32     HMAC-SHA256(bytes 0..96+X-1)
//
// The 64-byte key is scrypt(passphrase, salt, N, r, p): its first half is the AES key,
// its second half the HMAC key.
const (
	scryptMagic      = "scrypt"
	scryptHeaderSize = 96
	scryptMACSize    = 32
	// scryptOverhead is what the format adds to the data's length.
	scryptOverhead = scryptHeaderSize + scryptMACSize
)

// ScryptParams are the key derivation's cost parameters.
type ScryptParams struct {
	LogN uint8  // log2 of N, the CPU and memory cost
	R    uint32 // block size
	P    uint32 // parallelism
}

// DefaultScryptParams cost about 256 MiB and a second per file. The scrypt tool picks
// its own from the machine's speed (the recorded archive has logN 20, r 8, p 1).
var DefaultScryptParams = ScryptParams{LogN: 18, R: 8, P: 1}

// Errors of the scrypt file format.
var (
	ErrNotScrypt    = errors.New("not a scrypt file")
	ErrBadChecksum  = errors.New("scrypt header checksum mismatch")
	ErrBadPassword  = errors.New("scrypt header HMAC mismatch (wrong passphrase?)")
	ErrCorrupt      = errors.New("scrypt data HMAC mismatch (corrupt file)")
	ErrTooExpensive = errors.New("scrypt parameters exceed the allowed cost")
)

func (p ScryptParams) validate() error {
	if p.LogN < 1 || p.LogN > 63 || p.R == 0 || p.P == 0 || uint64(p.R)*uint64(p.P) >= 1<<30 {
		return fmt.Errorf("scrypt parameters logN=%d r=%d p=%d: out of range", p.LogN, p.R, p.P)
	}
	return nil
}

func deriveKeys(passphrase, salt []byte, p ScryptParams) (encKey, macKey []byte, err error) {
	dk, err := scrypt.Key(passphrase, salt, 1<<p.LogN, int(p.R), int(p.P), 64)
	if err != nil {
		return nil, nil, fmt.Errorf("scrypt key: %w", err)
	}
	return dk[:32], dk[32:], nil
}

// deriveKeysCtx is deriveKeys that gives up waiting when ctx ends.
func deriveKeysCtx(ctx context.Context, passphrase, salt []byte, p ScryptParams) (encKey, macKey []byte, err error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	type keys struct {
		enc, mac []byte
		err      error
	}
	done := make(chan keys, 1)
	go func() {
		var k keys
		k.enc, k.mac, k.err = deriveKeys(passphrase, salt, p)
		done <- k
	}()
	select {
	case k := <-done:
		return k.enc, k.mac, k.err
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
}

// Encrypter writes one scrypt file: Write the data, then Close to append the HMAC.
type Encrypter struct {
	w      io.Writer
	stream cipher.Stream
	mac    hash.Hash
	buf    []byte
	n      int64
	closed bool
}

// NewEncrypter derives the keys with a fresh random salt and writes the header to w.
// The derivation (about a second at the default cost) returns ctx's error as soon as
// ctx ends; it finishes in the background, its result dropped, as scrypt cannot stop.
func NewEncrypter(ctx context.Context, w io.Writer, passphrase []byte, p ScryptParams) (*Encrypter, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	var hdr [scryptHeaderSize]byte
	copy(hdr[:6], scryptMagic)
	hdr[6] = 0
	hdr[7] = p.LogN
	binary.BigEndian.PutUint32(hdr[8:12], p.R)
	binary.BigEndian.PutUint32(hdr[12:16], p.P)
	if _, err := rand.Read(hdr[16:48]); err != nil {
		return nil, fmt.Errorf("salt: %w", err)
	}
	sum := sha256.Sum256(hdr[:48])
	copy(hdr[48:64], sum[:16])
	encKey, macKey, err := deriveKeysCtx(ctx, passphrase, hdr[16:48], p)
	if err != nil {
		return nil, err
	}
	hm := hmac.New(sha256.New, macKey)
	hm.Write(hdr[:64])
	copy(hdr[64:96], hm.Sum(nil))

	block, err := aes.NewCipher(encKey)
	if err != nil {
		return nil, err
	}
	e := &Encrypter{w: w, stream: cipher.NewCTR(block, make([]byte, aes.BlockSize)), mac: hmac.New(sha256.New, macKey)}
	e.mac.Write(hdr[:])
	if _, err := w.Write(hdr[:]); err != nil {
		return nil, err
	}
	return e, nil
}

// Write encrypts p.
func (e *Encrypter) Write(p []byte) (int, error) {
	if e.closed {
		return 0, errors.New("scrypt: write after close")
	}
	if cap(e.buf) < len(p) {
		e.buf = make([]byte, len(p))
	}
	out := e.buf[:len(p)]
	e.stream.XORKeyStream(out, p)
	e.mac.Write(out)
	n, err := e.w.Write(out)
	e.n += int64(n)
	return n, err
}

// Close writes the final HMAC; it does not close the underlying writer.
func (e *Encrypter) Close() error {
	if e.closed {
		return nil
	}
	e.closed = true
	_, err := e.w.Write(e.mac.Sum(nil))
	return err
}

// Decrypt reads a whole scrypt file and returns its data once both HMACs check out.
// A file whose parameters cost more than maxLogN (0: 22) is refused before any work.
func Decrypt(file, passphrase []byte, maxLogN uint8) ([]byte, error) {
	var out bytes.Buffer
	if err := DecryptTo(&out, bytes.NewReader(file), passphrase, maxLogN); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// DecryptTo decrypts the scrypt file read from r into w. The data is written as it is
// read and authenticated only at the end: on an error, discard what w received.
func DecryptTo(w io.Writer, r io.Reader, passphrase []byte, maxLogN uint8) error {
	if maxLogN == 0 {
		maxLogN = 22
	}
	var hdr [scryptHeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return fmt.Errorf("%w: short header: %w", ErrNotScrypt, err)
	}
	if string(hdr[:6]) != scryptMagic || hdr[6] != 0 {
		return ErrNotScrypt
	}
	sum := sha256.Sum256(hdr[:48])
	if !bytes.Equal(sum[:16], hdr[48:64]) {
		return ErrBadChecksum
	}
	p := ScryptParams{LogN: hdr[7], R: binary.BigEndian.Uint32(hdr[8:12]), P: binary.BigEndian.Uint32(hdr[12:16])}
	if err := p.validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotScrypt, err)
	}
	if p.LogN > maxLogN || uint64(p.R)*uint64(p.P) > 64 {
		return fmt.Errorf("%w: logN=%d r=%d p=%d", ErrTooExpensive, p.LogN, p.R, p.P)
	}
	encKey, macKey, err := deriveKeys(passphrase, hdr[16:48], p)
	if err != nil {
		return err
	}
	hm := hmac.New(sha256.New, macKey)
	hm.Write(hdr[:64])
	if !hmac.Equal(hm.Sum(nil), hdr[64:96]) {
		return ErrBadPassword
	}
	block, err := aes.NewCipher(encKey)
	if err != nil {
		return err
	}
	stream := cipher.NewCTR(block, make([]byte, aes.BlockSize))
	mac := hmac.New(sha256.New, macKey)
	mac.Write(hdr[:])

	// Hold back the last 32 bytes read: they may be the trailing HMAC.
	buf := make([]byte, 64*1024+scryptMACSize)
	held := 0
	out := make([]byte, len(buf))
	for {
		n, rerr := r.Read(buf[held:])
		held += n
		if ready := held - scryptMACSize; ready > 0 {
			mac.Write(buf[:ready])
			stream.XORKeyStream(out[:ready], buf[:ready])
			if _, err := w.Write(out[:ready]); err != nil {
				return err
			}
			copy(buf, buf[ready:held])
			held = scryptMACSize
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if held < scryptMACSize {
		return fmt.Errorf("%w: truncated", ErrCorrupt)
	}
	if !hmac.Equal(mac.Sum(nil), buf[:scryptMACSize]) {
		return ErrCorrupt
	}
	return nil
}
