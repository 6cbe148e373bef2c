#!/usr/bin/env python3
"""Measure Admin API sockets with the Python client the dom0 tools use (qubesadmin).

usage: QUBESADMIN_SRC=DIR pybench.py [--clients 8] [--duration 3] [--rounds 3]
                                     [--floor SOCKET] NAME=SOCKET...

DIR is an unpacked qubes-core-admin-client tree (github.com/QubesOS/qubes-core-admin-client).
Each NAME=SOCKET is a daemon to measure (qubesbus, the real qubesd); --floor is the
recorded floor (`qubesbus bench --serve-floor`), which answers only reads. Rounds
alternate the order of the targets, so that what else the machine runs meanwhile
falls on each alike. Per round and target:

  property.Get  CLIENTS processes for DURATION s, each `vm.label` of qube work in a
                loop: one admin.vm.property.Get per call, a new connection each, as
                qubesadmin makes them;
  qvm-ls shape  one pass of one client as qvm-ls makes it: a fresh Qubes() with its
                cache on, admin.vm.List, then admin.vm.property.GetAll of every qube;
  feature.Set   CLIENTS processes for DURATION s, each setting its own feature of
                work, `vm.features['bench.cN'] = str(i)` (not on the floor).

Prints a markdown table: the range over rounds, and the median over rounds of each
round's time ratio to the floor (floor calls/s ÷ NAME calls/s; NAME's pass ÷ the
floor's). Exits 1 if any call failed.
"""
import argparse, multiprocessing, os, platform, statistics, sys, tempfile, threading, time

src = os.environ.get('QUBESADMIN_SRC')
if not src or not os.path.isdir(os.path.join(src, 'qubesadmin')):
    sys.exit('set QUBESADMIN_SRC to an unpacked qubes-core-admin-client tree')
# qubesadmin reads its version from package metadata, which an unpacked tree lacks
# (as ../shared/tools/qvm.py does).
meta = tempfile.mkdtemp()
os.makedirs(os.path.join(meta, 'qubesadmin-4.3.dist-info'))
with open(os.path.join(meta, 'qubesadmin-4.3.dist-info', 'METADATA'), 'w') as f:
    f.write('Metadata-Version: 2.1\nName: qubesadmin\nVersion: 4.3\n')
sys.path[:0] = [src, meta]
import qubesadmin, qubesadmin.app, qubesadmin.config

FLOOR = 'floor'


def connect(sock):
    """A dom0-style client of the socket sock."""
    qubesadmin.config.QUBESD_SOCKET = sock
    return qubesadmin.app.QubesLocal()


def worker(sock, kind, client, duration, barrier, out):
    """One client process: calls until duration has passed, then reports."""
    try:
        vm = connect(sock).domains['work']  # admin.vm.List, before the clock starts
    except Exception as e:  # reported: a child raises nothing
        barrier.abort()
        out.put((0, 1, 0.0, 'set-up: %r' % e))
        return
    if kind == 'get':
        def call(_):
            return vm.label
    else:
        key = 'bench.c%d' % client
        def call(i):
            vm.features[key] = str(i)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        out.put((0, 0, 0.0, None))
        return
    calls = errors = 0
    first = None
    start = time.monotonic()
    end = start + duration
    while time.monotonic() < end:
        try:
            call(calls + errors)
            calls += 1
        except Exception as e:
            errors += 1
            first = first or repr(e)
    out.put((calls, errors, time.monotonic() - start, first))


def rate(sock, kind, clients, duration):
    """Calls/s of clients processes, each making a new connection per call."""
    ctx = multiprocessing.get_context('fork')
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(sock, kind, c, duration, barrier, out)) for c in range(clients)]
    for p in procs:
        p.start()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    calls = sum(r[0] for r in res)
    errors = sum(r[1] for r in res)
    took = max(r[2] for r in res)
    first = next((r[3] for r in res if r[3]), None)
    return (calls / took if took > 0 else 0.0), errors, first


def ls_pass(sock):
    """Seconds of one qvm-ls-shaped pass, and the number of qubes it listed."""
    app = connect(sock)
    app.cache_enabled = True  # as qvm-ls: GetAll of each qube fills its cache
    start = time.perf_counter()
    n = 0
    for vm in app.domains:  # admin.vm.List
        vm.label  # the first property read of a qube: admin.vm.property.GetAll
        # GetAll failing falls back to property.Get: not the shape we measure
        if not vm._properties_cache:  # pylint: disable=protected-access
            raise RuntimeError('no GetAll answer for %s' % vm.name)
        n += 1
    return time.perf_counter() - start, n


def fmt_rate(xs):
    lo, hi = min(xs), max(xs)
    return '%s–%s /s' % (group(lo), group(hi)) if len(xs) > 1 else '%s /s' % group(lo)


def group(x):
    return '{:,.0f}'.format(x).replace(',', ' ')


def fmt_secs(xs):
    if min(xs) >= 1:
        f = '%.1f'
    else:
        f = '%.2f' if min(xs) >= 0.1 else '%.3f'
    return (f + '–' + f + ' s') % (min(xs), max(xs)) if len(xs) > 1 else (f + ' s') % xs[0]


def fmt_ratio(xs):
    return '%.2f (%.2f–%.2f)' % (statistics.median(xs), min(xs), max(xs)) if xs else '—'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--clients', type=int, default=8, help='concurrent client processes (default 8)')
    p.add_argument('--duration', type=float, default=3.0, help='seconds per rate measurement (default 3)')
    p.add_argument('--rounds', type=int, default=3, help='rounds (default 3)')
    p.add_argument('--floor', metavar='SOCKET', help='the recorded floor (qubesbus bench --serve-floor)')
    p.add_argument('targets', nargs='+', metavar='NAME=SOCKET')
    args = p.parse_args()
    targets = []
    for t in args.targets:
        name, sep, sock = t.partition('=')
        if not sep or not name or not sock or name == FLOOR:
            p.error('%r: want NAME=SOCKET (NAME not %r)' % (t, FLOOR))
        targets.append((name, os.path.abspath(sock)))
    if args.floor:
        targets.insert(1, (FLOOR, os.path.abspath(args.floor)))
    names = [n for n, _ in targets]
    get = {n: [] for n in names}
    ls = {n: [] for n in names}
    put = {n: [] for n in names if n != FLOOR}
    qubes = {}
    failures = []
    load0 = os.getloadavg()

    def note(what, name, errors, first):
        if errors:
            failures.append('%s on %s: %d errors, the first %s' % (what, name, errors, first))

    for r in range(args.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for name, sock in order:
            per_s, errors, first = rate(sock, 'get', args.clients, args.duration)
            note('property.Get', name, errors, first)
            get[name].append(per_s)
            try:
                took, qubes[name] = ls_pass(sock)
                ls[name].append(took)
            except Exception as e:
                note('qvm-ls shape', name, 1, repr(e))
            print('round %d %s: property.Get %.0f/s, qvm-ls shape %s' % (
                r + 1, name, per_s, '%.3f s' % ls[name][-1] if ls[name] else 'failed'), file=sys.stderr)
    # Changes last: reads are measured on the state every target started with.
    for r in range(args.rounds):
        for name, sock in targets:
            if name == FLOOR:
                continue
            per_s, errors, first = rate(sock, 'set', args.clients, args.duration)
            note('feature.Set', name, errors, first)
            put[name].append(per_s)
            print('round %d %s: feature.Set %.1f/s' % (r + 1, name, per_s), file=sys.stderr)
    load1 = os.getloadavg()

    others = [n for n in names if n != FLOOR]
    print('machine: %s, %d CPUs, %s, Python %s; load average %.2f before, %.2f after; '
          '%d rounds, %d clients, %g s per rate' % (
              platform.node(), os.cpu_count(), platform.machine(), platform.python_version(),
              load0[0], load1[0], args.rounds, args.clients, args.duration))
    print('qubes listed: %s' % ', '.join('%s %d' % (n, qubes[n]) for n in names if n in qubes))
    print()
    ratio_cols = [n for n in others if FLOOR in names]
    print('| workload | ' + ' | '.join(names) + ''.join(' | %s ÷ floor, time' % n for n in ratio_cols) + ' |')
    print('|---|' + '---|' * (len(names) + len(ratio_cols)))
    get_row = ['property.Get, %d clients' % args.clients] + [fmt_rate(get[n]) for n in names]
    ls_row = ['List + GetAll of every qube (qvm-ls shape)'] + [fmt_secs(ls[n]) if ls[n] else 'failed' for n in names]
    put_row = ['feature.Set, %d clients' % args.clients] + [fmt_rate(put[n]) if n != FLOOR else '—' for n in names]
    for n in ratio_cols:
        # per round, so that each ratio compares measurements taken close together
        get_row.append(fmt_ratio([f / x for f, x in zip(get[FLOOR], get[n]) if x > 0]))
        ls_row.append(fmt_ratio([x / f for f, x in zip(ls[FLOOR], ls[n]) if f > 0]) if len(ls[n]) == len(ls[FLOOR]) else '—')
        put_row.append('—')
    for row in (get_row, ls_row, put_row):
        print('| ' + ' | '.join(row) + ' |')
    if failures:
        print()
        for f in failures:
            print('- FAILED: ' + f)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
