package main

import (
	"bytes"
	"context"
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
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() < 2 || fs.NArg() > 3 {
		fmt.Fprintln(stderr, "usage: qubesbus query [--src NAME] [-e] METHOD DEST [ARG]")
		return 2
	}
	method, dest, arg := fs.Arg(0), fs.Arg(1), fs.Arg(2)
	var payload []byte
	if !*empty {
		var err error
		if payload, err = io.ReadAll(stdin); err != nil {
			fmt.Fprintln(stderr, "qubesbus query: read payload:", err)
			return 1
		}
	}
	resp, err := call(ctx, *socket, fmt.Sprintf("%s+%s %s name %s", method, arg, *src, dest), payload)
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus query:", err)
		return 1
	}
	switch {
	case len(resp) == 0:
		fmt.Fprintln(stderr, "qubesbus query: empty response (call aborted)")
		return 3
	case bytes.HasPrefix(resp, []byte("0\x00")):
		stdout.Write(resp[2:])
		return 0
	case bytes.HasPrefix(resp, []byte("2\x00")):
		parts := bytes.SplitN(resp[2:], []byte{0}, 4)
		if len(parts) >= 3 {
			fmt.Fprintf(stderr, "%s: %s\n", parts[0], parts[2])
			return 1
		}
	case bytes.HasPrefix(resp, []byte("1\x00")):
		stdout.Write(bytes.ReplaceAll(resp, []byte{0}, []byte{'\n'}))
		return 0
	}
	fmt.Fprintf(stderr, "qubesbus query: invalid response %q\n", resp)
	return 1
}

// call sends one request (header, NUL, payload), half-closes, and reads to EOF.
func call(ctx context.Context, socket, header string, payload []byte) ([]byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(10 * time.Minute))
	}
	req := append(append([]byte(header), 0), payload...)
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}
