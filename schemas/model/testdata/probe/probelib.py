"""What record_probe.py and record_scenarios.py share: a call over a qubesd socket, the
recording's escaping, one admin.Events subscriber, and a call written with the events
it caused (a dom0 feature probe-sync marks the end of each call's events)."""
import socket, sys, threading, time


def raw(sock, method, dest, arg='', payload=b''):
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    m = method + ('+' + arg if arg else '')
    s.sendall(m.encode() + b' dom0 name ' + dest.encode() + b'\0' + payload)
    s.shutdown(socket.SHUT_WR)
    buf = b''
    while True:
        d = s.recv(65536)
        if not d: break
        buf += d
    s.close()
    return buf


def esc(b):
    return ''.join(chr(c) if 32 <= c < 127 and c != 92 else '\\x%02x' % c for c in b)


def outcome(buf, content):
    """OK, OK<TAB>content (when content is asked for and there is some), EXC or ABORT."""
    if not buf: return 'ABORT'
    if buf[:2] == b'0\0': return 'OK' + ('\t' + esc(buf[2:]) if content and len(buf) > 2 else '')
    parts = buf.split(b'\0')
    return 'EXC %s: %s' % (parts[1].decode(), esc(parts[3]))


class Recorder:
    """Calls sock and writes each call, its outcome and its events in the probe format."""

    def __init__(self, sock, content):
        self.sock, self.content = sock, content
        self.events, self.cv, self.seq = [], threading.Condition(), 0
        threading.Thread(target=self._listen, daemon=True).start()
        time.sleep(0.5)
        self.sync()
        with self.cv: self.events.clear()

    def _listen(self):
        s = socket.socket(socket.AF_UNIX); s.connect(self.sock)
        s.sendall(b'admin.Events dom0 name dom0\0'); s.shutdown(socket.SHUT_WR)
        buf = b''
        while True:
            d = s.recv(65536)
            if not d: break
            buf += d
            while buf.startswith(b'1\0'):
                fields = []; i = 2; ok = False
                while True:
                    j = buf.find(b'\0', i)
                    if j < 0: break
                    f = buf[i:j]; i = j + 1
                    if f == b'' and len(fields) >= 2 and len(fields) % 2 == 0:
                        ok = True; break
                    fields.append(f)
                if not ok: break
                buf = buf[i:]
                with self.cv:
                    self.events.append(fields); self.cv.notify_all()

    def sync(self):
        self.seq += 1
        tag = str(self.seq).encode()
        raw(self.sock, 'admin.vm.feature.Set', 'dom0', 'probe-sync', tag)
        with self.cv:
            while not any(f[1] == b'domain-feature-set:probe-sync' and f[5] == tag for f in self.events):
                self.cv.wait(5)

    def run(self, method, dest, arg='', payload=b''):
        if isinstance(payload, str): payload = payload.encode()
        buf = raw(self.sock, method, dest, arg, payload)
        self.sync()
        with self.cv:
            evs = [f for f in self.events if f[1] != b'connection-established' and b'probe-sync' not in f[1]]
            self.events.clear()
        print('>>\t%s\t%s\t%s\t%s' % (method, dest, arg, esc(payload)))
        print('=\t' + outcome(buf, self.content))
        for f in evs:
            kw = ' '.join('%s=%s' % (esc(f[k]), esc(f[k+1])) for k in range(2, len(f), 2))
            print('.\t%s\t%s\t%s' % (esc(f[0]) or '_', esc(f[1]), kw))
        sys.stdout.flush()
        return buf
