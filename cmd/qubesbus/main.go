// Command qubesbus runs the Qubes OS Admin API as NATS services.
//
//	qubesbus run                   everything in one process (embedded NATS by default)
//	qubesbus setup                 create the streams and buckets on a NATS URL (as an admin)
//	qubesbus serve <service>       one service against a NATS URL
//	qubesbus query [--src NAME] METHOD DEST [ARG]   one call over the socket, like qubesd-query
//	qubesbus events [--vm NAME] [--since SEQ]       tail the events stream
//	qubesbus audit [--host H] [--since SEQ]         tail the audit trail
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/qubesbus/qubesbus/bus/buildinfo"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/telemetry"
)

func main() {
	// Every command watches ctx: the first SIGINT or SIGTERM stops it cleanly; once
	// it has come, the signals act as by default again, so a second one kills a stop
	// that hangs.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, stop)
	os.Exit(dispatch(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

const usage = `usage: qubesbus [--log-format text|json] <command> [flags]
       qubesbus <command> --help     the command's flags
       qubesbus --version

commands:
  run      serve the gateway socket and every service (embedded NATS unless --nats-url)
  setup    create the JetStream streams and buckets on --nats-url, as a user allowed to (then exit)
  serve    serve one service (serve --help lists them) on --nats-url
  query    make one Admin API call over the socket: query [--src NAME] METHOD DEST [ARG]
  bench    measure calls/s and latency per call class against the NATS and socket floor
  lab      run many simulated hosts on one NATS: lab --hosts N --qubes M [--nats-url URLS]
  events   tail the events stream: events [--host H] [--vm NAME] [--type GLOB] [--since SEQ|TIME] [--json]
  audit    tail the audit trail (changes and refused calls): audit [--host H] [--since SEQ|TIME] [--json] [-n N]
  version  print the module version and VCS revision of this build

--log-format (QUBESBUS_LOG_FORMAT): text (default) or json, one object per line;
QUBESBUS_LOG_LEVEL=debug for more.
`

func dispatch(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	// --log-format comes before the command (it applies to every one); so may
	// --version.
	format := envOr("QUBESBUS_LOG_FORMAT", "text")
	for len(args) > 0 {
		if f, ok := strings.CutPrefix(args[0], "--log-format="); ok {
			format, args = f, args[1:]
		} else if args[0] == "--log-format" && len(args) > 1 {
			format, args = args[1], args[2:]
		} else {
			break
		}
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	log, err := newLogger(format, stderr, logLevel())
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 2
	}
	switch args[0] {
	case "run", "serve", "lab":
		// Traces only from the commands that serve; off unless OTEL_* ask for them.
		shutdown, err := telemetry.Setup(ctx, os.Getenv, "qubesbus", buildinfo.Version(), log)
		if err != nil {
			fmt.Fprintln(stderr, "qubesbus:", err)
			return 2
		}
		defer func() {
			if err := shutdown(ctx); err != nil {
				log.Warn("tracing", "err", err)
			}
		}()
	}
	switch args[0] {
	case "version", "--version", "-version":
		fmt.Fprint(stdout, versionText())
		return 0
	case "run":
		return runCmd(ctx, args[1:], log, stdout, stderr)
	case "setup":
		return setupCmd(ctx, args[1:], log, stdout, stderr)
	case "serve":
		return serveCmd(ctx, args[1:], log, stdout, stderr)
	case "query":
		return queryCmd(ctx, args[1:], stdin, stdout, stderr)
	case "events":
		return eventsCmd(ctx, args[1:], stdout, stderr, log)
	case "audit":
		return auditCmd(ctx, args[1:], stdout, stderr, log)
	case "bench":
		return benchCmd(ctx, args[1:], stdout, stderr)
	case "lab":
		return labCmd(ctx, args[1:], stdout, stderr, log)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "qubesbus: unknown command %q\n%s", args[0], usage)
	return 2
}

func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("QUBESBUS_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}
