// Package telemetry installs OpenTelemetry tracing for a qubesbus process when the
// standard OTEL_* environment variables ask for it, and nothing otherwise: the
// services (through bus/tracing) then see the global no-op provider and do no
// tracing work at all.
package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// Enabled reports whether env (os.Getenv) asks for traces: an OTLP endpoint for
// traces is set (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT),
// or OTEL_TRACES_EXPORTER is otlp; and neither OTEL_SDK_DISABLED=true nor
// OTEL_TRACES_EXPORTER=none says no.
func Enabled(env func(string) string) bool {
	if strings.EqualFold(strings.TrimSpace(env("OTEL_SDK_DISABLED")), "true") {
		return false
	}
	switch strings.TrimSpace(env("OTEL_TRACES_EXPORTER")) {
	case "otlp":
		return true
	case "none":
		return false
	}
	return env("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// Setup installs a tracer provider that exports to an OTLP/HTTP collector when env
// enables tracing (Enabled), as the global provider. The exporter, batching, sampler
// and resource read their own OTEL_* variables (endpoint, headers, timeout,
// compression, certificates; OTEL_BSP_*; OTEL_TRACES_SAMPLER and its argument;
// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES). The returned shutdown flushes the
// spans still buffered; when tracing is off, Setup does nothing and shutdown returns
// nil at once.
func Setup(ctx context.Context, env func(string) string, service, version string, log *slog.Logger) (shutdown func(context.Context) error, err error) {
	noop := func(context.Context) error { return nil }
	disabled := strings.EqualFold(strings.TrimSpace(env("OTEL_SDK_DISABLED")), "true")
	if exp := strings.TrimSpace(env("OTEL_TRACES_EXPORTER")); !disabled && exp != "" && exp != "otlp" && exp != "none" {
		return noop, fmt.Errorf("OTEL_TRACES_EXPORTER=%s: qubesbus exports traces by otlp only", exp)
	}
	if !Enabled(env) {
		return noop, nil
	}
	protocol := env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = env("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	if protocol != "" && protocol != "http/protobuf" {
		return noop, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL=%s: qubesbus exports traces by http/protobuf only", protocol)
	}
	exporter, err := otlptracehttp.New(ctx)
	if err != nil {
		return noop, fmt.Errorf("otlp trace exporter: %w", err)
	}
	// Later options win: the environment overrides the service's own name.
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", service), attribute.String("service.version", version)),
		resource.WithTelemetrySDK(), resource.WithHost(), resource.WithFromEnv())
	if err != nil && res == nil {
		return noop, fmt.Errorf("trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	// An exporter that cannot reach its collector says so in the log, not on stderr
	// through OpenTelemetry's own logger.
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { log.Warn("opentelemetry", "err", err) }))
	otel.SetTracerProvider(tp)
	log.Info("tracing on", "exporter", "otlp/http")
	return func(ctx context.Context) error {
		// It runs at exit, when the command's context has ended.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := tp.Shutdown(ctx); err != nil {
			return fmt.Errorf("flush traces: %w", err)
		}
		return nil
	}, nil
}
