package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"unicode/utf8"

	"github.com/qubesbus/qubesbus/bus/buildinfo"
)

// parseFlags parses a command's flags. --help (-h) prints the command's synopsis and
// its own flags on stdout and ends it with exit 0; a bad flag prints them on stderr
// (after the flag package's message): exit 2. stop tells the command to return code.
func parseFlags(fs *flag.FlagSet, args []string, synopsis string, stdout io.Writer) (code int, stop bool) {
	stderr := fs.Output()
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, false
	case errors.Is(err, flag.ErrHelp):
		printUsage(fs, synopsis, stdout)
		return 0, true
	default:
		printUsage(fs, synopsis, stderr)
		return 2, true
	}
}

func printUsage(fs *flag.FlagSet, synopsis string, w io.Writer) {
	fmt.Fprintf(w, "usage: qubesbus %s\n\nflags:\n", synopsis)
	out := fs.Output()
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(out)
}

// isHelp tells a help flag given where a command expects a name first (serve).
func isHelp(arg string) bool {
	switch strings.TrimLeft(arg, "-") {
	case "h", "help":
		return strings.HasPrefix(arg, "-")
	}
	return false
}

// versionText is what `qubesbus version` prints: the module version, the VCS
// revision the binary was built from and the toolchain.
func versionText() string {
	in := buildinfo.Read()
	rev := in.Revision
	if rev == "" {
		rev = "unknown"
	}
	if in.Modified {
		rev += " (modified)"
	}
	return fmt.Sprintf("qubesbus %s\nmodule %s\nrevision %s\n%s\n", buildinfo.Version(), in.Module, rev, in.Go)
}

// newLogger builds the logger of every command: text (default) or json on w. Long
// values are clipped (clipLongValues).
func newLogger(format string, w io.Writer, level slog.Level) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: clipLongValues}
	switch format {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// maxLogValue is the longest string or error text a log line carries whole.
const maxLogValue = 1024

// clipLongValues cuts a string or error value (the message too) longer than
// maxLogValue to its first 256 bytes and its length: a qube name may be 60 KiB, and a
// client repeating calls with one must not make every refused call a 60 KiB line.
func clipLongValues(_ []string, a slog.Attr) slog.Attr {
	var text string
	switch a.Value.Kind() {
	case slog.KindString:
		text = a.Value.String()
	case slog.KindAny:
		err, ok := a.Value.Any().(error)
		if !ok {
			return a
		}
		text = err.Error()
	default:
		return a
	}
	if len(text) <= maxLogValue {
		return a
	}
	cut := 256
	for cut > 0 && !utf8.RuneStart(text[cut]) {
		cut-- // not inside a character
	}
	return slog.String(a.Key, fmt.Sprintf("%s… (%d bytes)", text[:cut], len(text)))
}
