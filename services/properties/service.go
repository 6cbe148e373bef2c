package properties

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/persistence/replica"
)

// VMClasses in qubesd's registry order (admin.vmclass.List).
var VMClasses = []string{"AppVM", "TemplateVM", "StandaloneVM", "AdminVM", "DispVM", "RemoteVM"}

// PowerStates tells the power state of qubes; the lifecycle service owns them.
type PowerStates interface {
	PowerStates(ctx context.Context) (map[string]string, error)
}

// Service is the properties service of one host.
type Service struct {
	host   subject.Host
	model  *replica.Replica
	powers PowerStates
	log    *slog.Logger
	mux    *rpc.Mux
}

// New returns the service over a model; it answers unknown methods too.
func New(host subject.Host, reg *rpc.Registry, model *replica.Replica, powers PowerStates, log *slog.Logger) *Service {
	s := &Service{host: host, model: model, powers: powers, log: log}
	s.mux = rpc.NewMux(reg, rpc.Properties, model, log)
	s.mux.HandleUnknown()
	s.mux.Handle("admin.vm.List", s.vmList)
	s.mux.Handle("admin.vmclass.List", s.vmclassList)
	s.mux.Handle("admin.label.List", s.labelList)
	return s
}

// Serve starts the service's endpoints on nc.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn, version string) (micro.Service, error) {
	return s.mux.Serve(ctx, nc, s.host, version)
}

func (s *Service) vmList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	states, err := s.powers.PowerStates(ctx)
	if err != nil {
		return nil, fmt.Errorf("power states: %w", err)
	}
	var b strings.Builder
	line := func(r rpc.Ref) {
		st := states[r.Name]
		if st == "" {
			st = "Halted"
		}
		fmt.Fprintf(&b, "%s class=%s state=%s uuid=%s\n", r.Name, r.Class, st, r.UUID)
	}
	if c.Dest.IsAdminVM() {
		for _, r := range s.model.Refs() {
			line(r)
		}
	} else {
		line(c.Dest)
	}
	return []byte(b.String()), nil
}

func (s *Service) vmclassList(context.Context, *rpc.Call) ([]byte, error) {
	return []byte(strings.Join(VMClasses, "\n") + "\n"), nil
}

func (s *Service) labelList(context.Context, *rpc.Call) ([]byte, error) {
	var b strings.Builder
	for _, l := range s.model.Labels() {
		b.WriteString(l.Name)
		b.WriteByte('\n')
	}
	return []byte(b.String()), nil
}
