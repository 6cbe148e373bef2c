package simdriver

import (
	"container/heap"
	"slices"
	"time"
)

// The simulation's asynchronous completions (a graceful shutdown finishing, a crash
// CrashAfter a start, a qrexec agent connecting BootLatency after the first unpause) are
// entries of one queue ordered by due time, ties broken by the order they were
// scheduled, i.e. the order the operations were requested. They are carried out from
// that queue only, under the hypervisor's lock, in that order: by the scheduler
// goroutine when they fall due, or earlier by any call of the hypervisor that finds them
// due (so that a call never observes a completion that is late only because the
// scheduler was not run yet). Two shutdowns with the same latency therefore always
// complete, and their stops are always reported, in the order they were requested,
// however the Go runtime schedules timers and goroutines.

// dueEntry is one scheduled completion.
type dueEntry struct {
	at    time.Time // due time (with its monotonic reading)
	seq   uint64    // scheduling order: breaks ties of at
	run   func()    // called with the hypervisor's lock held
	index int       // in the heap; -1 once run or cancelled
}

// dueQueue is a min-heap of entries by (at, seq).
type dueQueue []*dueEntry

func (q dueQueue) Len() int { return len(q) }
func (q dueQueue) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q dueQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}
func (q *dueQueue) Push(x any) {
	e := x.(*dueEntry)
	e.index = len(*q)
	*q = append(*q, e)
}
func (q *dueQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	e.index = -1
	return e
}

// scheduler is the queue and its goroutine, which runs only while entries are pending.
// All fields are guarded by the hypervisor's lock.
type scheduler struct {
	queue   dueQueue
	seq     uint64
	running bool          // the goroutine is alive
	wake    chan struct{} // a new earliest entry: the goroutine re-arms its timer
}

func newScheduler() scheduler { return scheduler{wake: make(chan struct{}, 1)} }

// cancelLocked removes an entry that has not run yet.
func (s *scheduler) cancelLocked(e *dueEntry) {
	if e.index >= 0 {
		heap.Remove(&s.queue, e.index)
	}
}

// afterLocked schedules run to happen after the given delay for domain instance d; it
// is dropped if d stops first. The caller holds h.mu.
func (h *Hypervisor) afterLocked(d *domain, after time.Duration, run func()) {
	s := &h.sched
	e := &dueEntry{at: time.Now().Add(after), seq: s.seq}
	s.seq++
	e.run = func() {
		if h.domains[d.name] == d {
			run()
		}
	}
	d.pending = slices.DeleteFunc(d.pending, func(p *dueEntry) bool { return p.index < 0 })
	d.pending = append(d.pending, e)
	heap.Push(&s.queue, e)
	if !s.running {
		s.running = true
		go h.schedule()
	} else if s.queue[0] == e {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// runDueLocked carries out, in order, every entry due at now. The caller holds h.mu.
func (h *Hypervisor) runDueLocked(now time.Time) {
	q := &h.sched.queue
	for q.Len() > 0 && !(*q)[0].at.After(now) {
		e := heap.Pop(q).(*dueEntry)
		e.run()
	}
}

// lock takes the hypervisor's lock and catches up with what is due.
func (h *Hypervisor) lock() {
	h.mu.Lock()
	h.runDueLocked(time.Now())
}

// schedule is the scheduler goroutine: it sleeps until the earliest entry is due, runs
// what is due, and ends when the queue is empty.
func (h *Hypervisor) schedule() {
	for {
		h.lock()
		if h.sched.queue.Len() == 0 {
			h.sched.running = false
			h.mu.Unlock()
			return
		}
		wait := time.Until(h.sched.queue[0].at)
		h.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-h.sched.wake:
			t.Stop()
		}
	}
}
