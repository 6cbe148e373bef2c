package subject

import (
	"crypto/sha256"
	hexenc "encoding/hex"
)

// MaxToken is the longest token a builder makes from a name. A client chooses the
// length of a tag, feature or property name (up to the gateway's 64 KiB request), and
// NATS refuses a protocol line longer than its max_control_line (4096 bytes by
// default; "PUB <subject> <reply> <size>"), closing the connection that sent it. With
// at most four name tokens (host, qube, event, suffix) of at most MaxToken bytes, an
// event subject stays under MaxEventSubject, far below that limit even with a reply
// subject beside it or embedded in a JetStream API subject
// ($JS.API.CONSUMER.CREATE.<stream>.<consumer>.<filter>). 128 keeps every name
// qubesd uses in practice readable and unchanged (qube names have at most 31
// characters, property and feature names a few dozen).
const MaxToken = 128

// MaxEventSubject bounds the length of every event subject Host.Event builds:
// "qubes.v1." + host + ".events." + qube + "." + event + "." + suffix.
const MaxEventSubject = len(Prefix) + 1 + MaxToken + len(".events.") + 3*(MaxToken+1)

// hashedPrefix starts every hashed token. EscapeToken never writes a '%' that is not
// followed by two upper-case hex digits (nor a lone "%" other than the empty name), so
// no escaped name starts with it, and UnescapeToken refuses it.
const hashedPrefix = "%~"

// hashedReadable is how many bytes of the escaped name a hashed token keeps, so that
// logs and subject listings still hint at the name.
const hashedReadable = 64

// HashedTokenLen is the length of every hashed token: the prefix, the readable part,
// '~' and 32 hex digits (the first 16 bytes of the name's SHA-256).
const HashedTokenLen = len(hashedPrefix) + hashedReadable + 1 + 2*16

// Token makes any name one bounded subject token. A name whose escaped form
// (EscapeToken) has at most MaxToken bytes is that escaped form, reversibly; a longer
// one becomes a hashed token of HashedTokenLen bytes:
//
//	%~<first 64 bytes of the escaped name>~<first 16 bytes of SHA-256(name), lower-case hex>
//
// which no escaped name can equal (see hashedPrefix), and two different long names
// share only with a 128-bit hash collision. A hashed token cannot be read back
// (UnescapeToken fails; it starts with hashedPrefix): the exact name travels in the message.
// Wildcards and per-family permissions still work, since a hashed token is one token.
func Token(name string) string {
	esc := EscapeToken(name)
	if len(esc) <= MaxToken {
		return esc
	}
	sum := sha256.Sum256([]byte(name))
	b := make([]byte, 0, HashedTokenLen)
	b = append(b, hashedPrefix...)
	b = append(b, esc[:hashedReadable]...)
	b = append(b, '~')
	b = hexenc.AppendEncode(b, sum[:16])
	return string(b)
}
