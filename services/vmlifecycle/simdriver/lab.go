package simdriver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/qubesbus/qubesbus/bus/buildinfo"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

// The lab API: request-reply on qubes.v1.<host>.lab.<op> (subject.Host.Lab), JSON in,
// LabReply out. A test lab drives the simulated hypervisor of a host through it.
//
//	op         request                                   effect
//	config     LabConfig (absent fields unchanged)       latencies, memory pool; replies the config
//	faults     LabFaults {vm, faults}                    replaces the qube's faults ({} clears)
//	crash      LabVM {vm}                                the domain crashes now
//	poweroff   LabVM {vm}                                the guest powers itself off now
//	pause      LabVM {vm}                                paused behind the service's back
//	unpause    LabVM {vm}                                unpaused behind the service's back
//	domains    {}                                        replies the active domains
//	plug       LabDevice {device}                        hot-plug: the device appears at its backend
//	unplug     LabPort {port}                            unplug: the device and its attachment go
//
// A backend crash is crash on the backend qube: its devices go with it.
const (
	LabOpConfig   = "config"
	LabOpFaults   = "faults"
	LabOpCrash    = "crash"
	LabOpPowerOff = "poweroff"
	LabOpPause    = "pause"
	LabOpUnpause  = "unpause"
	LabOpDomains  = "domains"
	LabOpPlug     = "plug"
	LabOpUnplug   = "unplug"
)

// LabDevice is a device to hot-plug (BlockDevice builds a block one as a backend's
// QubesDB describes it).
type LabDevice struct {
	Device device.Info `json:"device"`
}

// LabPort names a device to unplug.
type LabPort struct {
	Port device.Port `json:"port"`
}

// LabConfig changes the simulation; durations in milliseconds, nil leaves a value.
type LabConfig struct {
	BootLatencyMS     *int64 `json:"boot_latency_ms,omitempty"`
	ShutdownLatencyMS *int64 `json:"shutdown_latency_ms,omitempty"`
	MemoryMiB         *int   `json:"memory_mib,omitempty"`
}

// LabFaultSpec is Faults on the wire (durations in milliseconds).
type LabFaultSpec struct {
	StartFails         string `json:"start_fails,omitempty"`
	CrashAfterMS       int64  `json:"crash_after_ms,omitempty"`
	ShutdownHangs      bool   `json:"shutdown_hangs,omitempty"`
	SuspendUnsupported bool   `json:"suspend_unsupported,omitempty"`
	AgentNeverConnects bool   `json:"agent_never_connects,omitempty"`
	PreserveCrash      bool   `json:"preserve_crash,omitempty"`
}

// LabFaults sets the faults of one qube.
type LabFaults struct {
	VM     string       `json:"vm"`
	Faults LabFaultSpec `json:"faults"`
}

// LabVM names the qube an operation acts on.
type LabVM struct {
	VM string `json:"vm"`
}

// LabReply answers every lab request.
type LabReply struct {
	Error   string               `json:"error,omitempty"`
	Config  *LabConfig           `json:"config,omitempty"`
	Domains []vmlifecycle.Domain `json:"domains,omitempty"`
}

func ms(d time.Duration) *int64 { v := d.Milliseconds(); return &v }

// LabServiceName is the micro service of the lab endpoints of every host.
const LabServiceName = "qubesbus-simlab"

// LabServiceConfig configures the lab service of a host's simulated hypervisor.
type LabServiceConfig struct {
	Host       subject.Host
	Hypervisor *Hypervisor
}

// LabService answers the lab API of a host (New, then Serve, as every service).
type LabService struct{ cfg LabServiceConfig }

// NewLabService checks the configuration; Serve starts the service.
func NewLabService(cfg LabServiceConfig) (*LabService, error) {
	var errs []error
	if cfg.Host.ID() == "" {
		errs = append(errs, errors.New("no host"))
	}
	if cfg.Hypervisor == nil {
		errs = append(errs, errors.New("no hypervisor"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("lab service: %w", err)
	}
	return &LabService{cfg: cfg}, nil
}

// Serve answers the lab API on nc, as a micro service in its own queue group, until
// ctx ends or the returned service is stopped.
func (l *LabService) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	host, h := l.cfg.Host, l.cfg.Hypervisor
	svc, err := micro.AddService(nc, micro.Config{
		Name: LabServiceName, Version: buildinfo.Version(), QueueGroup: LabServiceName,
		Description: "simulated hypervisor control for test labs",
		Metadata:    map[string]string{"host": host.ID()},
	})
	if err != nil {
		return nil, fmt.Errorf("add lab service: %w", err)
	}
	vmOp := func(f func(string) error) func([]byte) LabReply {
		return func(data []byte) LabReply {
			var req LabVM
			if err := json.Unmarshal(data, &req); err != nil || req.VM == "" {
				return LabReply{Error: "request must name a vm"}
			}
			if err := f(req.VM); err != nil {
				return LabReply{Error: err.Error()}
			}
			return LabReply{}
		}
	}
	ops := map[string]func([]byte) LabReply{
		LabOpConfig: func(data []byte) LabReply {
			var req LabConfig
			if len(data) > 0 {
				if err := json.Unmarshal(data, &req); err != nil {
					return LabReply{Error: err.Error()}
				}
			}
			c := h.Config()
			if req.BootLatencyMS != nil {
				c.BootLatency = time.Duration(*req.BootLatencyMS) * time.Millisecond
			}
			if req.ShutdownLatencyMS != nil {
				c.ShutdownLatency = time.Duration(*req.ShutdownLatencyMS) * time.Millisecond
				if c.ShutdownLatency == 0 {
					c.ShutdownLatency = -1 // at once
				}
			}
			if req.MemoryMiB != nil {
				c.MemoryMiB = *req.MemoryMiB
			}
			h.SetConfig(c)
			c = h.Config()
			return LabReply{Config: &LabConfig{BootLatencyMS: ms(c.BootLatency), ShutdownLatencyMS: ms(c.ShutdownLatency), MemoryMiB: &c.MemoryMiB}}
		},
		LabOpFaults: func(data []byte) LabReply {
			var req LabFaults
			if err := json.Unmarshal(data, &req); err != nil || req.VM == "" {
				return LabReply{Error: "request must name a vm"}
			}
			f := req.Faults
			h.SetFaults(req.VM, Faults{StartFails: f.StartFails, CrashAfter: time.Duration(f.CrashAfterMS) * time.Millisecond,
				ShutdownHangs: f.ShutdownHangs, SuspendUnsupported: f.SuspendUnsupported, AgentNeverConnects: f.AgentNeverConnects,
				PreserveCrash: f.PreserveCrash})
			return LabReply{}
		},
		LabOpCrash:    vmOp(h.Crash),
		LabOpPowerOff: vmOp(h.PowerOff),
		LabOpPause:    vmOp(h.PauseBehind),
		LabOpUnpause:  vmOp(h.UnpauseBehind),
		LabOpPlug: func(data []byte) LabReply {
			var req LabDevice
			if err := json.Unmarshal(data, &req); err != nil || req.Device.Backend == "" || req.Device.ID == "" || !device.KnownClass(req.Device.Class) {
				return LabReply{Error: "request must name a device: backend, port id and a known class"}
			}
			h.Plug(req.Device)
			return LabReply{}
		},
		LabOpUnplug: func(data []byte) LabReply {
			var req LabPort
			if err := json.Unmarshal(data, &req); err != nil || req.Port.Backend == "" || req.Port.ID == "" {
				return LabReply{Error: "request must name a port"}
			}
			if err := h.Unplug(req.Port); err != nil {
				return LabReply{Error: err.Error()}
			}
			return LabReply{}
		},
		LabOpDomains: func([]byte) LabReply {
			doms, _ := h.Domains(context.Background())
			return LabReply{Domains: doms}
		},
	}
	for op, f := range ops {
		err := svc.AddEndpoint(op, micro.HandlerFunc(func(r micro.Request) {
			_ = r.RespondJSON(f(r.Data()))
		}), micro.WithEndpointSubject(host.Lab(op)))
		if err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add lab endpoint %s: %w", op, err)
		}
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	context.AfterFunc(ctx, func() { _ = svc.Stop() })
	return svc, nil
}

// LabClient drives a host's simulated hypervisor over NATS.
type LabClient struct {
	NC   *nats.Conn
	Host subject.Host
}

func (c LabClient) call(ctx context.Context, op string, req any) (LabReply, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return LabReply{}, err
	}
	msg, err := c.NC.RequestWithContext(ctx, c.Host.Lab(op), b)
	if err != nil {
		return LabReply{}, fmt.Errorf("lab %s: %w", op, err)
	}
	var rep LabReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return LabReply{}, fmt.Errorf("lab %s reply: %w", op, err)
	}
	if rep.Error != "" {
		return rep, fmt.Errorf("lab %s: %s", op, rep.Error)
	}
	return rep, nil
}

// Configure changes the simulation.
func (c LabClient) Configure(ctx context.Context, cfg LabConfig) (LabConfig, error) {
	rep, err := c.call(ctx, LabOpConfig, cfg)
	if err != nil || rep.Config == nil {
		return LabConfig{}, err
	}
	return *rep.Config, nil
}

// SetFaults replaces the faults of a qube.
func (c LabClient) SetFaults(ctx context.Context, vm string, f LabFaultSpec) error {
	_, err := c.call(ctx, LabOpFaults, LabFaults{VM: vm, Faults: f})
	return err
}

// Crash crashes a qube now.
func (c LabClient) Crash(ctx context.Context, vm string) error {
	_, err := c.call(ctx, LabOpCrash, LabVM{VM: vm})
	return err
}

// PowerOff makes a qube's guest power itself off now.
func (c LabClient) PowerOff(ctx context.Context, vm string) error {
	_, err := c.call(ctx, LabOpPowerOff, LabVM{VM: vm})
	return err
}

// Pause pauses a qube behind the service's back.
func (c LabClient) Pause(ctx context.Context, vm string) error {
	_, err := c.call(ctx, LabOpPause, LabVM{VM: vm})
	return err
}

// Unpause unpauses a qube behind the service's back.
func (c LabClient) Unpause(ctx context.Context, vm string) error {
	_, err := c.call(ctx, LabOpUnpause, LabVM{VM: vm})
	return err
}

// Plug hot-plugs a device at its backend.
func (c LabClient) Plug(ctx context.Context, d device.Info) error {
	_, err := c.call(ctx, LabOpPlug, LabDevice{Device: d})
	return err
}

// Unplug removes a device from its backend.
func (c LabClient) Unplug(ctx context.Context, p device.Port) error {
	_, err := c.call(ctx, LabOpUnplug, LabPort{Port: p})
	return err
}

// Domains lists the active domains.
func (c LabClient) Domains(ctx context.Context) ([]vmlifecycle.Domain, error) {
	rep, err := c.call(ctx, LabOpDomains, struct{}{})
	return rep.Domains, err
}
