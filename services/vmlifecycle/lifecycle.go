package vmlifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
)

// reason is str(exception) of an error, as domain-start-failed and
// domain-shutdown-failed carry it.
func reason(err error) string {
	var qe *qerr.Error
	if errors.As(err, &qe) {
		return qe.Message
	}
	return err.Error()
}

// qube returns the configuration of the call's destination; it may have been removed
// since the checks ran.
func (s *Service) qube(name string) (Qube, error) {
	q, ok := s.inv.Qube(name)
	if !ok {
		return Qube{}, errNotFound(name)
	}
	return q, nil
}

// domainOp is a power operation on qube q, run under the qube's lock with its domain
// reconciled: d is the active domain, nil if there is none.
type domainOp func(ctx context.Context, q Qube, d *Domain) error

// locked is the prologue of the power operations: it looks the qube up, refuses dom0
// and RemoteVMs with the operation's error, takes the qube's lock, reconciles its
// domain with the driver and runs op.
func (s *Service) locked(ctx context.Context, name string, refuse func(Qube) error, op domainOp) error {
	q, err := s.qube(name)
	if err != nil {
		return err
	}
	if q.IsAdminVM() || q.IsRemote() {
		return refuse(q)
	}
	unlock, err := s.lock(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	return s.reconciled(ctx, q, op)
}

// reconciled reconciles q's domain and runs op on it. The caller holds q's lock.
func (s *Service) reconciled(ctx context.Context, q Qube, op domainOp) error {
	d, err := s.reconcile(ctx, q)
	if err != nil {
		return err
	}
	return op(ctx, q, d)
}

// refuseAbort refuses dom0 and RemoteVMs by aborting the call, naming the operation
// and the qube's class.
func refuseAbort(op string) func(Qube) error {
	return func(q Qube) error { return qerr.Abort(op + " of a " + q.Class) }
}

// refuseWith refuses dom0 and RemoteVMs with qubesd's exception for each.
func refuseWith(dom0, remote error) func(Qube) error {
	return func(q Qube) error {
		if q.IsAdminVM() {
			return dom0
		}
		return remote
	}
}

// driverFailed is the error of an operation whose driver call (verb) on q's domain
// failed: if the domain is gone, stopped since it was reconciled, its stop is
// announced and the operation fails with gone; any other failure aborts the call.
func (s *Service) driverFailed(ctx context.Context, q Qube, verb string, err error, gone *qerr.Error) error {
	if errors.Is(err, ErrNoDomain) {
		_, _ = s.reconcile(ctx, q)
		return gone
	}
	return fmt.Errorf("%w: %s %s: %w", qerr.ErrAbort, verb, q.Name, err)
}

// reconcile reads a qube's domain from the driver and, if the instance the service
// knew of is gone without its stop announced yet, announces it now, so that what a
// locked operation sees and what subscribers were told agree. The caller holds the
// qube's lock. It returns the active domain or nil.
func (s *Service) reconcile(ctx context.Context, q Qube) (*Domain, error) {
	d, ok, err := s.drv.Domain(ctx, q.Name)
	if err != nil {
		return nil, fmt.Errorf("%w: read domain %s: %w", qerr.ErrAbort, q.Name, err)
	}
	r := s.run(q.Name)
	s.mu.Lock()
	known := r.xid
	s.mu.Unlock()
	if known >= 0 && (!ok || d.XID != known) {
		s.announceStop(ctx, q, known)
	}
	if !ok {
		return nil, nil
	}
	if known != d.XID {
		s.setInstance(q.Name, d.XID)
	}
	return &d, nil
}

func (s *Service) setInstance(name string, xid int) {
	r := s.run(name)
	s.mu.Lock()
	r.xid = xid
	s.mu.Unlock()
}

// announceStop publishes the stop of domain instance xid unless it was announced
// already, then removes a disposable with auto_cleanup. The caller holds the lock.
func (s *Service) announceStop(ctx context.Context, q Qube, xid int) {
	r := s.run(q.Name)
	s.mu.Lock()
	if r.xid != xid {
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	_ = s.emit(ctx, stopEvents(q.Name)...)
	if q.Class == "DispVM" && q.AutoCleanup {
		s.cleanup(ctx, q)
	}
	s.mu.Lock()
	r.xid = -1
	close(r.stopped)
	r.stopped = make(chan struct{})
	s.mu.Unlock()
}

// cleanup removes a disposable after it stopped (qubesd's auto_cleanup): the global
// domain-pre-delete and domain-delete around the removal from the configuration.
func (s *Service) cleanup(ctx context.Context, q Qube) {
	_ = s.emit(ctx, evPreDelete(q.Name))
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	volumeConfig := s.volumeConfig(q.Name) // storage: removed with the disposable, below
	rev, err := s.store.Apply(actx, config.Mutation{
		Ops:           []config.Op{{Kind: config.OpDelDomain, Domain: q.DomainID}},
		ChangesConfig: true,
	})
	if err != nil {
		s.log.Error("remove disposable after shutdown", "vm", q.Name, "err", err)
		return
	}
	if err := s.model.WaitRevision(actx, rev); err != nil {
		s.log.Warn("wait for the disposable's removal", "vm", q.Name, "err", err)
	}
	_ = s.emit(ctx, evDelete(q.Name))
	s.removeVolumes(ctx, q.Name, volumeConfig, rev) // storage
}

// --- Start ---

// vmStart starts a qube and, first, its netvm chain (docs/spec/events.md §3). Starting a
// qube that is not Halted does nothing.
func (s *Service) vmStart(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.start(ctx, c.Dest.Name, nil)
}

// start runs with downstream holding their locks (the qubes in path).
func (s *Service) start(ctx context.Context, name string, path []string) error {
	unlock, err := s.lock(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	q, err := s.qube(name)
	if err != nil {
		return err
	}
	switch {
	case q.IsAdminVM():
		return errStartDom0
	case q.IsRemote():
		return errStartRemote
	}
	d, err := s.reconcile(ctx, q)
	if err != nil {
		return err
	}
	if d != nil {
		return nil
	}
	if q.ProhibitStart != "" {
		err := errStartProhibited(q.ProhibitStart)
		_ = s.emit(ctx, evStartFailed(name, err.Message))
		return err
	}
	if err := s.emit(ctx, evPreStart(name)); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	fail := func(err error) error {
		_ = s.emit(ctx, evStartFailed(name, reason(err)))
		return err
	}
	// Devices: every required assignment has a device, checked right after
	// domain-pre-start as qubesd does (devices.go).
	if err := s.checkRequiredDevices(ctx, name); err != nil {
		var he *devicectl.HypervisorError
		if errors.As(err, &he) {
			// A libvirt error: admin.vm.Start's handler wraps it, the event has it bare.
			_ = s.emit(ctx, evStartFailed(name, he.Msg))
			return errStartFailed(he.Msg)
		}
		return fail(err)
	}
	// Storage: every image the start needs is there (Storage.verify, which fires
	// domain-verify-files once it has looked).
	if err := s.verifyVolumes(ctx, q); err != nil {
		return fail(err)
	}
	if err := s.emit(ctx, evVerifyFiles(name)); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if err := s.startNetVM(ctx, q, append(path, name)); err != nil {
		return fail(err)
	}
	if err := s.drv.ReserveMemory(ctx, name, q.Memory); err != nil {
		if errors.Is(err, ErrNotEnoughMemory) {
			return fail(errMemory(name))
		}
		return fail(errStartFailed(err.Error()))
	}
	// Storage: the volumes are prepared before the domain exists (volumes.go).
	if err := s.prepareVolumes(ctx, q); err != nil {
		if rerr := s.drv.ReleaseMemory(ctx, name); rerr != nil {
			s.log.Warn("release memory", "vm", name, "err", rerr)
		}
		return fail(err)
	}
	_ = s.emit(ctx, evPreSpawn(name))
	dom, err := s.drv.Create(ctx, DomainSpec{Name: name, UUID: q.UUID, MemoryMiB: q.Memory, MaxMemMiB: q.MaxMem,
		VCPUs: q.VCPUs, VirtMode: q.VirtMode, Qrexec: q.Qrexec})
	if err != nil {
		if rerr := s.drv.ReleaseMemory(ctx, name); rerr != nil {
			s.log.Warn("release memory", "vm", name, "err", rerr)
		}
		serr := fail(errStartFailed(err.Error()))
		s.stopVolumes(ctx, q) // storage: as qubesd's storage.stop() here
		return serr
	}
	s.setInstance(name, dom.XID)
	// Devices: the required ones are part of the created domain, before it runs
	// (devices.go).
	if err := s.attachRequiredDevices(ctx, name); err != nil {
		return s.abortStart(ctx, q, dom.XID, err)
	}
	evs := runtimeResets(name)
	evs = append(evs, evSpawn(name), evQdbCreate(name), evPreUnpaused(name))
	_ = s.emit(ctx, evs...)
	if err := s.drv.Unpause(ctx, name); err != nil {
		return s.abortStart(ctx, q, dom.XID, errStartFailed(err.Error()))
	}
	_ = s.emit(ctx, evUnpaused(name))
	if q.Qrexec {
		wctx, cancel := context.WithTimeout(ctx, time.Duration(q.QrexecTimeout)*time.Second)
		err := s.drv.WaitAgent(wctx, name, dom.XID)
		cancel()
		if err != nil && ctx.Err() != nil {
			// The service is stopping: the domain stays, a restarted service adopts it.
			return fmt.Errorf("%w: %w", qerr.ErrAbort, ctx.Err())
		}
		if err != nil {
			return s.abortStart(ctx, q, dom.XID, errQrexec(name, q.QrexecTimeout))
		}
	}
	_ = s.emit(ctx, evStart(name))
	return nil
}

// startNetVM starts the netvm of q if it is a local qube that is not running.
func (s *Service) startNetVM(ctx context.Context, q Qube, path []string) error {
	if q.NetVM == "" {
		return nil
	}
	nq, ok := s.inv.Qube(q.NetVM)
	if !ok || nq.IsAdminVM() || nq.IsRemote() {
		return nil
	}
	if slices.Contains(path, nq.Name) {
		return qerr.ValueError("Loops in network are unsupported")
	}
	_, active, err := s.drv.Domain(ctx, nq.Name)
	if err != nil {
		return fmt.Errorf("%w: read domain %s: %w", qerr.ErrAbort, nq.Name, err)
	}
	if active {
		return nil
	}
	return s.start(ctx, nq.Name, path)
}

// abortStart ends a start that failed after the domain was created: start-failed,
// then the domain is destroyed (if still there) and its stop announced.
func (s *Service) abortStart(ctx context.Context, q Qube, xid int, err *qerr.Error) error {
	_ = s.emit(ctx, evStartFailed(q.Name, err.Message))
	if derr := s.drv.Destroy(ctx, q.Name); derr != nil && !errors.Is(derr, ErrNoDomain) {
		s.log.Warn("destroy after failed start", "vm", q.Name, "err", derr)
	}
	s.announceStop(ctx, q, xid)
	return err
}

// --- Shutdown ---

// ShutdownOptions are the tokens of admin.vm.Shutdown's argument.
type ShutdownOptions struct {
	Force bool // skip the vetoes (qubes using this one), destroy a paused qube
	Wait  bool // return once Halted, or fail after shutdown_timeout
}

// ParseShutdownArg parses "", "force", "wait", "force+wait", "wait+force" (any tokens
// of force and wait joined by +).
func ParseShutdownArg(arg string) (ShutdownOptions, error) {
	var o ShutdownOptions
	if arg == "" {
		return o, nil
	}
	for _, tok := range strings.Split(arg, "+") {
		switch tok {
		case "force":
			o.Force = true
		case "wait":
			o.Wait = true
		default:
			return o, errShutdownArgs
		}
	}
	return o, nil
}

// vmShutdown asks a qube to power off (docs/spec/events.md §3, docs/spec/methods.md
// §1.4). With Wait, it waits for the stop without the qube's lock.
func (s *Service) vmShutdown(ctx context.Context, c *rpc.Call) ([]byte, error) {
	o, err := ParseShutdownArg(c.Arg)
	if err != nil {
		return nil, err
	}
	var w *stopWait
	err = s.locked(ctx, c.Dest.Name, refuseAbort("shutdown"), func(ctx context.Context, q Qube, d *Domain) (err error) {
		w, err = s.shutdown(ctx, q, d, o)
		return err
	})
	if err != nil || w == nil {
		return nil, err
	}
	return nil, s.waitStop(ctx, w)
}

// stopWait is what a shutdown with wait waits for once the guest was asked to power
// off: the stop of domain instance xid of q, announced when stopped is closed.
type stopWait struct {
	q       Qube
	xid     int
	stopped <-chan struct{}
}

// shutdown is the locked part of vmShutdown. It returns what to wait for if o.Wait and
// the guest was asked to power off, nil otherwise.
func (s *Service) shutdown(ctx context.Context, q Qube, d *Domain, o ShutdownOptions) (*stopWait, error) {
	if d == nil {
		return nil, errNotStarted(q.Name)
	}
	if err := s.emit(ctx, evPreShutdown(q.Name, o.Force)); err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if !o.Force {
		if err := s.shutdownVeto(ctx, q); err != nil {
			return nil, s.shutdownFailed(ctx, q, err)
		}
	}
	if d.State == HVPaused {
		if !o.Force {
			return nil, s.shutdownFailed(ctx, q, errNotRunning(q.Name))
		}
		if err := s.drv.Destroy(ctx, q.Name); err != nil && !errors.Is(err, ErrNoDomain) {
			return nil, s.shutdownFailed(ctx, q, errShutdownTimeout(q.Name))
		}
		s.announceStop(ctx, q, d.XID)
		return nil, nil
	}
	if err := s.drv.Shutdown(ctx, q.Name); err != nil {
		if errors.Is(err, ErrNoDomain) {
			// It stopped on its own since reconcile: announce it, done.
			_, err := s.reconcile(ctx, q)
			return nil, err
		}
		return nil, s.shutdownFailed(ctx, q, errShutdownTimeout(q.Name))
	}
	if !o.Wait {
		return nil, nil
	}
	r := s.run(q.Name)
	s.mu.Lock()
	defer s.mu.Unlock()
	return &stopWait{q: q, xid: r.xid, stopped: r.stopped}, nil
}

// waitStop waits up to shutdown_timeout for the stop; the caller does not hold the
// qube's lock.
func (s *Service) waitStop(ctx context.Context, w *stopWait) error {
	timer := time.NewTimer(time.Duration(w.q.ShutdownTimeout) * time.Second)
	defer timer.Stop()
	select {
	case <-w.stopped:
		return nil
	case <-timer.C:
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", qerr.ErrAbort, ctx.Err())
	}
	// As qubesd, decide under the lock: the stop may have just happened.
	unlock, err := s.lock(ctx, w.q.Name)
	if err != nil {
		return err
	}
	defer unlock()
	d, err := s.reconcile(ctx, w.q)
	if err != nil {
		return err
	}
	if d != nil && d.XID == w.xid {
		return s.shutdownFailed(ctx, w.q, errShutdownTimeout(w.q.Name))
	}
	return nil
}

// shutdownFailed announces domain-shutdown-failed and returns err.
func (s *Service) shutdownFailed(ctx context.Context, q Qube, err *qerr.Error) error {
	_ = s.emit(ctx, evShutdownFailed(q.Name, err.Message))
	return err
}

// shutdownVeto is what qubesd's domain-pre-shutdown handlers refuse without force:
// stopping a qube that running qubes use as netvm, GuiVM or AudioVM.
func (s *Service) shutdownVeto(ctx context.Context, q Qube) *qerr.Error {
	doms, err := s.drv.Domains(ctx)
	if err != nil {
		return nil
	}
	active := make(map[string]bool, len(doms))
	for _, d := range doms {
		active[d.Name] = true
	}
	var net, gui, audio []string
	for _, o := range s.inv.Qubes() {
		if o.Name == q.Name || !active[o.Name] || o.IsAdminVM() {
			continue
		}
		if o.NetVM == q.Name {
			net = append(net, o.Name)
		}
		if o.GuiVM == q.Name {
			gui = append(gui, o.Name)
		}
		if o.AudioVM == q.Name {
			audio = append(audio, o.Name)
		}
	}
	switch {
	case len(net) > 0:
		return errConnectedVMs(net)
	case len(gui) > 0:
		return errGuiVMInUse(gui)
	case len(audio) > 0:
		return errAudioVMInUse(audio)
	}
	return nil
}

// --- Kill ---

// vmKill destroys a qube's domain at once; it returns after the stop was announced.
func (s *Service) vmKill(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.locked(ctx, c.Dest.Name, refuseWith(errKillDom0, errKillRemote), s.kill)
}

func (s *Service) kill(ctx context.Context, q Qube, d *Domain) error {
	if d == nil {
		return errNotStarted(q.Name)
	}
	if err := s.drv.Destroy(ctx, q.Name); err != nil {
		return s.driverFailed(ctx, q, "destroy", err, errNotStarted(q.Name))
	}
	s.announceStop(ctx, q, d.XID)
	return nil
}

// --- Pause, Unpause, Suspend, Resume ---

// vmPause freezes a qube: domain-pre-paused, then domain-paused once the hypervisor
// paused it. Pausing a paused qube announces both again, as qubesd does (it pauses
// through libvirt again, which reports the domain suspended once more).
func (s *Service) vmPause(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.locked(ctx, c.Dest.Name, refuseAbort("pause"), s.pause)
}

func (s *Service) pause(ctx context.Context, q Qube, d *Domain) error {
	if d == nil {
		return errNotRunning(q.Name)
	}
	if err := s.emit(ctx, evPrePaused(q.Name)); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if err := s.drv.Pause(ctx, q.Name); err != nil {
		return s.driverFailed(ctx, q, "pause", err, errNotRunning(q.Name))
	}
	_ = s.emit(ctx, evPaused(q.Name))
	return nil
}

// vmUnpause resumes a paused qube.
func (s *Service) vmUnpause(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.locked(ctx, c.Dest.Name, refuseAbort("unpause"), s.unpause)
}

func (s *Service) unpause(ctx context.Context, q Qube, d *Domain) error {
	if d == nil || d.State != HVPaused {
		return errNotPaused(q.Name)
	}
	if err := s.emit(ctx, evPreUnpaused(q.Name)); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if err := s.drv.Unpause(ctx, q.Name); err != nil {
		return s.driverFailed(ctx, q, "unpause", err, errNotPaused(q.Name))
	}
	_ = s.emit(ctx, evUnpaused(q.Name))
	return nil
}

// vmSuspend puts a qube into ACPI S3; a guest that cannot suspend is paused instead.
func (s *Service) vmSuspend(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.locked(ctx, c.Dest.Name, refuseWith(errSuspendDom0, errSuspendRem), s.suspend)
}

func (s *Service) suspend(ctx context.Context, q Qube, d *Domain) error {
	if d == nil {
		return errNotRunning(q.Name)
	}
	if d.State == HVPaused && q.Qrexec {
		// qubesd first asks the guest over qrexec (qubes.SuspendPre), which a paused
		// domain refuses.
		return qerr.VMNotRunningError("Domain " + qerr.Repr(q.Name) + " is paused")
	}
	err := s.drv.Suspend(ctx, q.Name)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrUnsupported):
		return s.reconciled(ctx, q, s.pause) // Pause, reading the domain again
	}
	return s.driverFailed(ctx, q, "suspend", err, errNotRunning(q.Name))
}

// vmResume wakes a suspended qube (domain-resumed); otherwise it is Unpause.
func (s *Service) vmResume(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.locked(ctx, c.Dest.Name, refuseAbort("resume"), s.resume)
}

func (s *Service) resume(ctx context.Context, q Qube, d *Domain) error {
	if d == nil || d.State != HVPMSuspended {
		return s.reconciled(ctx, q, s.unpause) // Unpause, reading the domain again
	}
	if err := s.drv.Wakeup(ctx, q.Name); err != nil {
		return s.driverFailed(ctx, q, "wake", err, errNotPaused(q.Name))
	}
	_ = s.emit(ctx, evResumed(q.Name))
	return nil
}

// --- CurrentState ---

func (s *Service) vmCurrentState(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qube(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	var mem, maxMem, cpu int64
	state := Halted
	switch {
	case q.IsRemote():
		state = Running
	default:
		d, ok, err := s.drv.Domain(ctx, q.Name)
		if err != nil {
			return nil, fmt.Errorf("%w: read domain %s: %w", qerr.ErrAbort, q.Name, err)
		}
		if ok {
			mem, maxMem, cpu = d.MemoryKiB, d.MaxMemKiB, d.CPUTime.Nanoseconds()
			state = powerOf(&d, q.Qrexec)
		}
		if q.IsAdminVM() {
			state = Running
		}
	}
	return fmt.Appendf(nil, "mem=%d mem_static_max=%d cputime=%d power_state=%s", mem, maxMem, cpu, state), nil
}

// --- hypervisor notices ---

// noticeQueue keeps the notices of one qube in order while a worker handles them.
type noticeQueue struct {
	items   []Notice
	running bool
}

// follow handles the driver's notices until ctx ends, in the order the hypervisor
// reported them, like qubesd's single event loop: a notice whose qube is not locked is
// handled at once; one whose qube is busy (a start waiting for its agent) waits in that
// qube's queue, so that it holds up neither other qubes nor the qube's later notices.
func (s *Service) follow(ctx context.Context, notices <-chan Notice) {
	for {
		select {
		case <-ctx.Done():
			return
		case n, ok := <-notices:
			if !ok {
				return
			}
			s.dispatch(ctx, n)
		}
	}
}

func (s *Service) dispatch(ctx context.Context, n Notice) {
	r := s.run(n.Name)
	s.mu.Lock()
	q := s.queues[n.Name]
	if q == nil {
		q = &noticeQueue{}
		s.queues[n.Name] = q
	}
	if !q.running {
		select {
		case r.lock <- struct{}{}: // free: handle now, in order
			s.mu.Unlock()
			s.begin()
			s.handleNoticeLocked(ctx, n)
			s.end()
			<-r.lock
			return
		default:
		}
	}
	q.items = append(q.items, n)
	if !q.running {
		q.running = true
		go s.drain(ctx, n.Name, q)
	}
	s.mu.Unlock()
}

func (s *Service) drain(ctx context.Context, name string, q *noticeQueue) {
	for {
		s.mu.Lock()
		if len(q.items) == 0 || ctx.Err() != nil {
			q.running = false
			q.items = nil
			s.mu.Unlock()
			return
		}
		n := q.items[0]
		q.items = q.items[1:]
		s.mu.Unlock()
		s.handleNotice(ctx, n)
	}
}

func (s *Service) handleNotice(ctx context.Context, n Notice) {
	unlock, err := s.lock(ctx, n.Name)
	if err != nil {
		return
	}
	defer unlock()
	s.handleNoticeLocked(ctx, n)
}

// handleNoticeLocked announces what the hypervisor reported, unless it concerns a
// domain instance whose stop was already announced. The caller holds the lock.
func (s *Service) handleNoticeLocked(ctx context.Context, n Notice) {
	q, ok := s.inv.Qube(n.Name)
	if !ok {
		q = Qube{Name: n.Name}
	}
	r := s.run(n.Name)
	s.mu.Lock()
	current := r.xid == n.XID
	// A stop from before this instance watched, of a qube with no known instance: the
	// previous instance may have died before announcing it. Announcing it again is
	// better than never (the previous one may have announced it and died before the
	// notice was acknowledged).
	missed := n.Backlog && n.Kind == NoticeStopped && r.xid == -1
	if missed {
		r.xid = n.XID
	}
	s.mu.Unlock()
	if !current && !missed {
		return // announced already (Kill, a failed start) or an instance we never knew
	}
	switch n.Kind {
	case NoticeStopped:
		s.announceStop(ctx, q, n.XID)
	case NoticePaused:
		_ = s.emit(ctx, evPaused(n.Name))
	case NoticeUnpaused:
		_ = s.emit(ctx, evUnpaused(n.Name))
	}
}

// --- Console ---

// vmConsole answers the path of the terminal of a qube's console, for the caller to
// attach to (qubesd answers libvirt's tty of the domain; dom0's console has none, so
// the answer is empty). A qube without an active domain — halted, or a RemoteVM,
// which has no domain here — gets QubesVMNotRunningError. A paused qube's domain is
// active, and its console answers as in qubesd.
func (s *Service) vmConsole(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qube(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	switch {
	case q.IsAdminVM():
		return nil, nil
	case q.IsRemote():
		return nil, errNotRunning(q.Name)
	}
	path, err := s.drv.Console(ctx, q.Name)
	switch {
	case errors.Is(err, ErrNoDomain):
		return nil, errNotRunning(q.Name)
	case err != nil:
		return nil, fmt.Errorf("%w: console of %s: %w", qerr.ErrAbort, q.Name, err)
	}
	return []byte(path), nil
}
