# Re-record: start the oracle (shared/oracle/start-oracle.sh SOCKET testdata/qubes.xml), then
#   python3 record_probe.py SOCKET > qubesd.txt
"""Records the property probe against a fresh qubesd: every property of every fixture
qube and of the global holder, a grid of values by API type plus a few per property,
then a Reset; one admin.Events subscriber; a dom0 feature probe-sync marks the end of
each call's events."""
import socket, sys, threading, time
SOCK = sys.argv[1]
def raw(method, dest, arg='', payload=b''):
    s = socket.socket(socket.AF_UNIX); s.connect(SOCK)
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
def outcome(buf):
    if not buf: return 'ABORT'
    if buf[:2] == b'0\0': return 'OK'
    parts = buf.split(b'\0')
    return 'EXC %s: %s' % (parts[1].decode(), esc(parts[3]))
def esc(b):
    return ''.join(chr(c) if 32 <= c < 127 and c != 92 else '\\x%02x' % c for c in b)
events = []; cv = threading.Condition()
def listen():
    s = socket.socket(socket.AF_UNIX); s.connect(SOCK)
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
            with cv:
                events.append(fields); cv.notify_all()
threading.Thread(target=listen, daemon=True).start()
time.sleep(0.5)
seq = [0]
def sync():
    seq[0] += 1
    tag = str(seq[0]).encode()
    raw('admin.vm.feature.Set', 'dom0', 'probe-sync', tag)
    with cv:
        while not any(f[1] == b'domain-feature-set:probe-sync' and f[5] == tag for f in events):
            cv.wait(5)
sync()
with cv: events.clear()
def run(method, dest, arg, payload):
    r = outcome(raw(method, dest, arg, payload))
    sync()
    with cv:
        evs = [f for f in events if f[1] != b'connection-established' and b'probe-sync' not in f[1]]
        events.clear()
    print('>>\t%s\t%s\t%s\t%s' % (method, dest, arg, esc(payload)))
    print('=\t' + r)
    for f in evs:
        kw = ' '.join('%s=%s' % (esc(f[k]), esc(f[k+1])) for k in range(2, len(f), 2))
        print('.\t%s\t%s\t%s' % (esc(f[0]) or '_', esc(f[1]), kw))
    sys.stdout.flush()
BY_TYPE = {
    'bool': [b'True', b'off', b'maybe', b''],
    'int': [b'99999999999999999999', b'-99999999999999999999', b'0', b'+0_7', b'abc'],
    'vm': [b'', b'sys-net', b'dom0', b'default-dvm', b'fedora-41', b'legacy', b'nosuch', b'none'],
    'label': [b'green', b'label-3', b'label-99', b'nope'],
    'str': [b'', b'x/y', b'a\x01b'],
}
EXTRA = {
    'kernel': [b'6.12.40-1.fc41', b'5.0'], 'default_kernel': [b'6.12.40-1.fc41', b'5.0'],
    'kernelopts': [b'quiet', b'a' * 513], 'keyboard_layout': [b'de+neo+grp:alt', b'us', b'u1++', b'us+a b+'],
    'virt_mode': [b'HVM', b'xen'], 'default_user': [b'root', b'a b'], 'mac': [b'00:16:3E:5E:6C:01'],
    'devices_denied': [b'u03****b******', b'abc', b'x123456'], 'ip': [b'10.1.1.1', b'10.0.0.256'],
    'ip6': [b'fd09::1', b'fd09::g'], 'bootmode': [b'debug'], 'appvm_default_bootmode': [b'debug'],
    'default_pool': [b'varlibqubes', b'nosuch'], 'default_pool_private': [b'varlibqubes', b'nosuch'],
    'memory': [b'1'], 'vcpus': [b'3'], 'maxmem': [b'4000'],
}
qubes = ['dom0', 'default-dvm', 'fedora-41', 'legacy', 'personal', 'sys-firewall', 'sys-net', 'untrusted', 'work']
targets = [(q, 'admin.vm.property.') for q in qubes] + [('dom0', 'admin.property.')]
for dest, prefix in targets:
    rows = raw(prefix + 'GetAll', dest)[2:].decode().splitlines()
    for row in rows:
        name, rest = row.split(' ', 1)
        typ = rest.split(' ')[1][len('type='):]
        vals = BY_TYPE[typ] + EXTRA.get(name, [])
        for v in vals:
            run(prefix + 'Set', dest, name, v)
        if not (prefix == 'admin.property.' and name == 'default_kernel'):
            run(prefix + 'Reset', dest, name, b'')
