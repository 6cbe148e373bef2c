package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"
)

// queryCmd makes one call over the socket and prints the result like qubesd-query:
// the content on stdout, or the exception class and message on stderr (exit 1); an
// empty response (the call was aborted) exits 3.
func queryCmd(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("query", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", envOr("QUBESBUS_SOCKET", "run/qubesd.sock"), "gateway socket path (QUBESBUS_SOCKET)")
	src := fs.String("src", "dom0", "source qube")
	empty := fs.Bool("e", false, "send an empty payload instead of reading stdin")
	if code, stop := parseFlags(fs, args, "query [--src NAME] [-e] METHOD DEST [ARG]", stdout); stop {
		return code
	}
	if fs.NArg() < 2 || fs.NArg() > 3 {
		fmt.Fprintln(stderr, "usage: qubesbus query [--src NAME] [-e] METHOD DEST [ARG]")
		return 2
	}
	method, dest, arg := fs.Arg(0), fs.Arg(1), fs.Arg(2)
	var payload []byte
	if !*empty {
		// A signal ends the wait for stdin too.
		type result struct {
			b   []byte
			err error
		}
		read := make(chan result, 1)
		go func() {
			b, err := io.ReadAll(stdin)
			read <- result{b, err}
		}()
		select {
		case r := <-read:
			if r.err != nil {
				fmt.Fprintln(stderr, "qubesbus query: read payload:", r.err)
				return 1
			}
			payload = r.b
		case <-ctx.Done():
			fmt.Fprintln(stderr, "qubesbus query: interrupted:", context.Cause(ctx))
			return 1
		}
	}
	// A stream of events (admin.Events, admin.vm.Stats) is printed as it arrives and
	// ends with a signal: exit 0. Any other response is printed once it is whole.
	var resp []byte
	streaming := false
	err := callTo(ctx, *socket, fmt.Sprintf("%s+%s %s name %s", method, arg, *src, dest), payload, func(b []byte) error {
		if !streaming {
			resp = append(resp, b...)
			if len(resp) < len(eventHeader) || !bytes.HasPrefix(resp, eventHeader) {
				return nil
			}
			streaming, b, resp = true, resp, nil
		}
		_, err := stdout.Write(bytes.ReplaceAll(b, []byte{0}, []byte{'\n'}))
		return err
	})
	if streaming {
		if err != nil && ctx.Err() == nil {
			fmt.Fprintln(stderr, "qubesbus query:", err)
			return 1
		}
		return 0
	}
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(stderr, "qubesbus query: interrupted:", context.Cause(ctx))
		} else {
			fmt.Fprintln(stderr, "qubesbus query:", err)
		}
		return 1
	}
	switch {
	case len(resp) == 0:
		fmt.Fprintln(stderr, "qubesbus query: empty response (call aborted)")
		return 3
	case bytes.HasPrefix(resp, []byte("0\x00")):
		// Unlike qubesd-query, the output ends with a newline (unless it is empty).
		out := resp[2:]
		if len(out) > 0 && out[len(out)-1] != '\n' {
			out = append(out, '\n')
		}
		stdout.Write(out)
		return 0
	case bytes.HasPrefix(resp, []byte("2\x00")):
		parts := bytes.SplitN(resp[2:], []byte{0}, 4)
		if len(parts) >= 3 {
			msg := string(parts[2])
			if msg == "" {
				// qubesd refuses without a message (PermissionDenied); say what was
				// refused.
				call := method
				if arg != "" {
					call += "+" + arg
				}
				msg = fmt.Sprintf("%s refused (source %s, destination %s)", call, *src, dest)
			}
			fmt.Fprintf(stderr, "%s: %s\n", parts[0], msg)
			return 1
		}
	}
	fmt.Fprintf(stderr, "qubesbus query: invalid response %q\n", resp)
	return 1
}

// eventHeader starts every frame of a stream of events.
var eventHeader = []byte("1\x00")

// callTo sends one request (header, NUL, payload), half-closes, and passes the
// response to read as it arrives, to EOF or until ctx ends (then with ctx's error).
func callTo(ctx context.Context, socket, header string, payload []byte, read func([]byte) error) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	// ctx ending (a signal) ends a write or read in progress at once. No other limit:
	// a stream goes on until the client stops it.
	defer context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })()
	req := append(append([]byte(header), 0), payload...)
	fail := func(err error) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}
	if _, err := c.Write(req); err != nil {
		return fail(err)
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return fail(err)
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if err := read(buf[:n]); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fail(err)
		}
	}
}
