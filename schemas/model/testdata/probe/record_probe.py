# Re-record: start the oracle (shared/oracle/start-oracle.sh SOCKET testdata/qubes.xml), then
#   python3 record_probe.py SOCKET > qubesd.txt
"""Records the property probe against a fresh qubesd: every property of every fixture
qube and of the global holder, a grid of values by API type plus a few per property,
then a Reset; one admin.Events subscriber; a dom0 feature probe-sync marks the end of
each call's events."""
import sys
from probelib import Recorder, esc, raw as _raw
SOCK = sys.argv[1]
def raw(method, dest, arg='', payload=b''): return _raw(SOCK, method, dest, arg, payload)
rec = Recorder(SOCK, content=False)
run = rec.run
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
