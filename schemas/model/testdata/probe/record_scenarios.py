# Re-record: start the oracle (shared/oracle/start-oracle.sh SOCKET testdata/qubes.xml) fresh
# for each file, then
#   python3 record_scenarios.py SOCKET ints > ints.txt
#   python3 record_scenarios.py SOCKET scenarios > scenarios.txt
#   python3 record_scenarios.py SOCKET create > create.txt
"""Records the second round of issue 15's probe against a fresh qubesd, in
record_probe.py's format (an OK answer with content is written "OK<TAB>content"):

ints: every int property of every fixture qube and of the global holder set to a grid
of integer texts, each accepted one read back (Get), the qube's GetAll with every int
property at 20 digits, then a Reset; every str property set to text with each of
Python's whitespace characters and read back.

scenarios: the handlers that announce other properties (netvm, provides_network, ip,
ip6, the servicevm, net.fake-* and ipv6 features, guivm, audiovm, template,
keyboard_layout, the global defaults) on halted qubes and on running, connected and
paused ones; checks in pre-set handlers (kernel, template, netvm of a running qube);
pausing and unpausing twice; exception classes; a qube's repr in messages; the calls
qubesd crashes on (replaced by deviations.txt).

create: what admin.vm.Create.* refuses and what a new qube announces and inherits
(the creator's tag-created-vm-with and set-created-guivm), a second template and what
a template change re-announces, removals refused and done."""
import sys
from probelib import Recorder, esc, raw as _raw
SOCK = sys.argv[1]
def raw(method, dest, arg='', payload=b''): return _raw(SOCK, method, dest, arg, payload)
rec = Recorder(SOCK, content=True)
run, sync = rec.run, rec.sync
def vset(vm, prop, value): return run('admin.vm.property.Set', vm, prop, value)
def vget(vm, prop): return run('admin.vm.property.Get', vm, prop)
def vreset(vm, prop): return run('admin.vm.property.Reset', vm, prop)
def gset(prop, value): return run('admin.property.Set', 'dom0', prop, value)
def greset(prop): return run('admin.property.Reset', 'dom0', prop)
def fset(vm, name, value): return run('admin.vm.feature.Set', vm, name, value)
def fdel(vm, name): return run('admin.vm.feature.Remove', vm, name)

qubes = ['dom0', 'default-dvm', 'fedora-41', 'legacy', 'personal', 'sys-firewall', 'sys-net', 'untrusted', 'work']
INTS = [b'99999999999999999999', b'-99999999999999999999', b'123456789012345678901234567890123',
        b' 42 ', b'\t7\n', b'1_000', b'007', b'-0', b'+5', b'0x10', b'1e3', b'4.0', b'1__0', b'_1',
        b'', '\u0663'.encode()]
STRS = [b'a b', b'a\tb', b'a\nb', b'a\rb', b'a\\b', b' a\n']
# Python's printable set holds \v and \f, which qubes.xml cannot: qubesd keeps the value in
# memory and crashes saving it (deviations.txt)
CRASH_STRS = [b'a\x0bb', b'a\x0cb']

def ints():
    targets = [(q, 'admin.vm.property.') for q in qubes] + [('dom0', 'admin.property.')]
    for dest, prefix in targets:
        rows = raw(prefix + 'GetAll', dest)[2:].decode().splitlines()
        props = [(r.split(' ')[0], r.split(' ')[2][len('type='):]) for r in rows]
        for name, typ in props:
            if typ != 'int': continue
            for v in INTS:
                if run(prefix + 'Set', dest, name, v)[:2] == b'0\0':
                    run(prefix + 'Get', dest, name)
                    if name == 'memory':
                        run(prefix + 'Get', dest, 'maxmem')
            run(prefix + 'Set', dest, name, b'99999999999999999999')
        run(prefix + 'GetAll', dest)
        for name, typ in props:
            if typ == 'int':
                run(prefix + 'Reset', dest, name)
        for name, typ in props:
            if typ != 'str': continue
            for v in STRS:
                if run(prefix + 'Set', dest, name, v)[:2] == b'0\0':
                    run(prefix + 'Get', dest, name)
            run(prefix + 'GetAll', dest)
            if not (prefix == 'admin.property.' and name == 'default_kernel'):
                run(prefix + 'Reset', dest, name)
    for dest, prefix, name in [('work', 'admin.vm.property.', 'kernelopts'), ('work', 'admin.vm.property.', 'default_user'),
                               ('legacy', 'admin.vm.property.', 'kernelopts')]:
        for v in CRASH_STRS:
            run(prefix + 'Set', dest, name, v)
        run(prefix + 'Get', dest, name)
        run(prefix + 'Reset', dest, name)

def halted():
    # netvm and provides_network, with qubes connected (work and personal use
    # sys-firewall, sys-firewall uses sys-net)
    vget('work', 'visible_gateway')
    vset('work', 'netvm', 'sys-net'); vset('work', 'netvm', 'sys-net')
    vset('work', 'netvm', ''); vset('work', 'netvm', '')
    vreset('work', 'netvm'); vreset('work', 'netvm')
    vset('sys-firewall', 'provides_network', 'False')
    vset('sys-firewall', 'provides_network', 'True')
    vreset('sys-firewall', 'provides_network')
    vget('sys-firewall', 'provides_network'); vget('work', 'visible_gateway')
    vset('sys-firewall', 'provides_network', 'False')
    vset('sys-firewall', 'provides_network', 'True')
    vset('untrusted', 'provides_network', 'True'); vset('untrusted', 'provides_network', 'True')
    vset('personal', 'netvm', 'untrusted')
    vset('untrusted', 'netvm', 'personal')
    vset('untrusted', 'provides_network', 'False')
    vreset('untrusted', 'provides_network')
    vreset('personal', 'netvm')
    vset('untrusted', 'provides_network', 'False')
    vreset('untrusted', 'provides_network')
    # ip, ip6 of a provider and of a client
    vset('sys-net', 'ip', '10.137.0.50'); vset('sys-net', 'ip', '10.137.0.50')
    vget('sys-firewall', 'visible_gateway'); vreset('sys-net', 'ip')
    vset('sys-firewall', 'ip6', 'fd09:24ef:4179::a89:5'); vreset('sys-firewall', 'ip6')
    vset('work', 'ip', '10.137.0.51'); vreset('work', 'ip')
    # features that re-announce properties
    fset('work', 'servicevm', '1'); fset('work', 'servicevm', '1'); vget('work', 'icon')
    fdel('work', 'servicevm'); fset('work', 'servicevm', '')
    fdel('work', 'servicevm')
    fset('fedora-41', 'servicevm', '1'); fdel('fedora-41', 'servicevm')
    fset('sys-net', 'net.fake-ip', '192.168.1.5'); vget('sys-net', 'visible_ip')
    fset('sys-net', 'net.fake-ip', '192.168.1.5'); fdel('sys-net', 'net.fake-ip')
    fset('sys-net', 'net.fake-ip', 'nope')
    fset('sys-net', 'net.fake-gateway', '192.168.1.1'); fset('sys-net', 'net.fake-gateway', 'x')
    fset('sys-net', 'net.fake-netmask', '24'); fset('sys-net', 'net.fake-netmask', '33')
    fset('sys-net', 'net.fake-netmask', '255.255.255.0'); fset('sys-net', 'net.fake-netmask', 'x')
    fset('sys-net', 'ipv6', '1'); vget('sys-firewall', 'visible_gateway6'); vget('sys-net', 'visible_ip6')
    fset('sys-net', 'ipv6', '1'); fset('sys-firewall', 'ipv6', '1'); fdel('sys-net', 'ipv6')
    fdel('sys-firewall', 'ipv6')
    fset('work', 'gui', '1'); fdel('work', 'gui')
    # the features extensions check or act on (services, vm-config, custom-persist,
    # preload-dispvm-*, boot modes, meminfo-writer)
    for name, value in [('service.crond', '1'), ('service.', '1'), ('service.a/b', '1'), ('service...', '1'),
                        ('service.' + 'x' * 49, '1'), ('service.app-dispvm.' + 'x' * 40, '1'),
                        ('vm-config.foo', 'bar'), ('vm-config.', 'x'), ('vm-config.1abc', 'x'),
                        ('vm-config.' + 'a' * 53, 'x'), ('vm-config.' + 'a' * 52, 'x'),
                        ('custom-persist.home', '/home/user'), ('custom-persist.', '/x'),
                        ('custom-persist.rel', 'home'), ('custom-persist.f', 'file:user:user:0644:/etc/x'),
                        ('custom-persist.g', 'sock:user:user:0644:/etc/x'), ('custom-persist.m', 'dir:u:u:9999:/x'),
                        ('custom-persist.n', 'dir:u:u:0777:x'), ('custom-persist.' + 'k' * 54, '/x'),
                        ('boot-mode.active', 'debug'), ('boot-mode.kernelopts.debug', 'x'),
                        ('preload-dispvm-max', '1'), ('preload-dispvm-delay', 'x'),
                        ('preload-dispvm-threshold', 'x'), ('preload-dispvm', ''), ('deferred-netvm-original', ''),
                        ('x y', '1'), ('ok', 'a\x0bb'), ('ok', 'a\tb'), ('ok', '\u00e9')]:
        fset('work', name, value)
        fdel('work', name)
    fset('work', 'service.meminfo-writer', '1'); vget('work', 'maxmem')
    fset('work', 'service.meminfo-writer', ''); vget('work', 'maxmem')
    run('admin.vm.feature.Get', 'work', 'service.meminfo-writer'); vreset('work', 'maxmem')
    for vm in ['dom0', 'default-dvm']:
        for name, value in [('preload-dispvm-max', '1'), ('preload-dispvm-max', 'x'), ('preload-dispvm-max', ''),
                            ('preload-dispvm-threshold', '5'), ('preload-dispvm-threshold', '-1'),
                            ('preload-dispvm-delay', '1.5'), ('preload-dispvm-delay', '1e3'), ('preload-dispvm-delay', 'x')]:
            fset(vm, name, value)
        for name in ['preload-dispvm-max', 'preload-dispvm-threshold', 'preload-dispvm-delay']:
            fdel(vm, name)
    fset('default-dvm', 'qrexec', '1'); fset('default-dvm', 'preload-dispvm-max', '1')
    fset('default-dvm', 'supported-rpc.qubes.WaitForRunningSystem', '1'); fset('default-dvm', 'preload-dispvm-max', '1')
    fset('default-dvm', 'supported-rpc.qubes.WaitForSession', '1'); fset('default-dvm', 'preload-dispvm-max', '0')
    fdel('default-dvm', 'preload-dispvm-max')
    for name in ['qrexec', 'supported-rpc.qubes.WaitForRunningSystem', 'supported-rpc.qubes.WaitForSession']:
        fdel('default-dvm', name)
    # tags, and what a created-by tag brings
    for tag in ['t1', 'guivm-x', 'created-by-dom0', 'created-by-nosuch', 'a b', '']:
        run('admin.vm.tag.Set', 'work', tag); run('admin.vm.tag.Remove', 'work', tag)
    fset('dom0', 'tag-created-vm-with', 'x1 x2'); fset('dom0', 'set-created-guivm', 'sys-net')
    run('admin.vm.tag.Set', 'untrusted', 'created-by-dom0'); vget('untrusted', 'guivm')
    run('admin.vm.tag.List', 'untrusted')
    for tag in ['created-by-dom0', 'x1', 'x2', 'guivm-sys-net']:
        run('admin.vm.tag.Remove', 'untrusted', tag)
    vreset('untrusted', 'guivm')
    fdel('dom0', 'tag-created-vm-with'); fdel('dom0', 'set-created-guivm')
    # a new qube, its defaults and announcements
    run('admin.vm.Create.AppVM', 'dom0', 'fedora-41', b'name=probe1 label=red')
    run('admin.vm.property.Get', 'probe1', 'netvm'); run('admin.vm.tag.List', 'probe1')
    vset('probe1', 'netvm', 'sys-net'); vset('probe1', 'provides_network', 'True')
    vset('work', 'netvm', 'probe1'); vset('probe1', 'provides_network', 'False')
    vset('probe1', 'memory', '99999999999999999999'); vset('probe1', 'template', '')
    vreset('work', 'netvm')
    run('admin.vm.Remove', 'probe1')
    # GUI and audio qubes and their tags
    run('admin.vm.tag.Get', 'work', 'guivm-dom0')
    vset('work', 'guivm', 'dom0'); vset('work', 'guivm', 'sys-net'); vset('work', 'guivm', 'sys-net')
    vget('work', 'keyboard_layout')
    vset('sys-net', 'keyboard_layout', 'fr++'); vget('work', 'keyboard_layout')
    vset('work', 'guivm', ''); vget('work', 'keyboard_layout'); vreset('work', 'guivm')
    vreset('sys-net', 'keyboard_layout')
    run('admin.vm.tag.Set', 'work', 'guivm-sys-net'); run('admin.vm.tag.Set', 'work', 'audiovm-x')
    vset('work', 'audiovm', 'dom0'); vset('work', 'audiovm', 'sys-net'); vset('work', 'audiovm', '')
    vreset('work', 'audiovm'); vreset('work', 'guivm')
    run('admin.vm.tag.Remove', 'work', 'audiovm-x')
    gset('default_guivm', 'sys-firewall'); gset('default_guivm', 'sys-firewall')
    vget('work', 'keyboard_layout'); greset('default_guivm')
    gset('default_audiovm', 'sys-firewall'); gset('default_audiovm', ''); greset('default_audiovm')
    vset('dom0', 'keyboard_layout', 'de++'); vset('dom0', 'keyboard_layout', 'de++')
    vset('work', 'keyboard_layout', 'us+a-b+')
    vset('dom0', 'keyboard_layout', 'fr++'); vreset('dom0', 'keyboard_layout'); vreset('work', 'keyboard_layout')
    # a guivm loop: qubesd takes it, then cannot read keyboard_layout (deviations.txt)
    vset('work', 'guivm', 'work'); vget('work', 'keyboard_layout')
    vreset('work', 'guivm')
    vset('sys-net', 'guivm', 'work'); vset('work', 'guivm', 'sys-net')
    vget('sys-net', 'keyboard_layout')
    vreset('work', 'guivm'); vreset('sys-net', 'guivm')
    vset('work', 'keyboard_layout', 'us++'); vset('work', 'guivm', 'work'); vget('work', 'keyboard_layout')
    vreset('work', 'keyboard_layout'); vreset('work', 'guivm'); vreset('work', 'keyboard_layout')
    gset('default_guivm', 'work'); vget('work', 'keyboard_layout'); greset('default_guivm')
    # templates and boot modes
    fset('fedora-41', 'boot-mode.kernelopts.debug', 'debug=1')
    vset('fedora-41', 'appvm_default_bootmode', 'debug'); vget('work', 'bootmode')
    vset('work', 'template', 'fedora-41'); vreset('work', 'template')
    vset('default-dvm', 'template', 'fedora-41')
    vreset('fedora-41', 'appvm_default_bootmode'); fdel('fedora-41', 'boot-mode.kernelopts.debug')
    vset('fedora-41', 'kernelopts', 'quiet'); vget('work', 'kernelopts'); vreset('fedora-41', 'kernelopts')
    vset('fedora-41', 'memory', '500'); vget('work', 'memory'); vreset('fedora-41', 'memory')
    # global defaults followed by qubes
    gset('default_netvm', 'sys-firewall'); gset('default_netvm', 'sys-net'); gset('default_netvm', '')
    greset('default_netvm')
    gset('default_dispvm', ''); greset('default_dispvm')
    gset('default_kernel', '6.12.40-1.fc41')
    gset('default_template', 'fedora-41')
    gset('clockvm', 'sys-firewall'); gset('clockvm', ''); greset('clockvm')
    gset('default_qrexec_timeout', '99999999999999999999'); vget('work', 'qrexec_timeout')
    gset('default_shutdown_timeout', '99999999999999999999'); vget('work', 'shutdown_timeout')
    run('admin.vm.property.GetAll', 'work')
    greset('default_qrexec_timeout'); greset('default_shutdown_timeout')
    # checks in pre-set handlers and in setters
    vset('work', 'kernel', '5.0'); vset('work', 'kernel', 'a/b'); vset('work', 'kernel', '')
    vreset('work', 'kernel')
    vset('fedora-41', 'template_for_dispvms', 'True'); vset('fedora-41', 'template_for_dispvms', 'False')
    vset('default-dvm', 'template_for_dispvms', 'False')
    vset('work', 'default_dispvm', 'work'); vset('work', 'default_dispvm', 'fedora-41')
    vset('work', 'management_dispvm', 'nosuch'); vset('work', 'netvm', 'nosuch')
    vset('work', 'virt_mode', 'HVM'); vset('work', 'virt_mode', 'pv'); vreset('work', 'virt_mode')
    vset('work', 'label', 'label-x'); vset('work', 'label', 'label-08'); vset('work', 'label', 'label- 3')
    vset('work', 'label', 'label-+3'); vreset('work', 'label')
    vset('work', 'devices_denied', 'u******'); vset('work', 'devices_denied', 'U******')
    vreset('work', 'devices_denied')
    vset('work', 'memory', '99999999999999999999'); vget('work', 'maxmem')
    vset('work', 'template', '')
    vreset('work', 'memory')

def running():
    run('admin.vm.Start', 'work')
    vget('work', 'start_time'); vget('work', 'xid')
    run('admin.vm.property.GetAll', 'sys-firewall')
    vset('work', 'template', '')
    # netvm of a running qube
    vset('work', 'netvm', 'sys-net'); vreset('work', 'netvm')
    vset('untrusted', 'provides_network', 'True')
    vset('work', 'netvm', 'untrusted')
    vset('sys-firewall', 'provides_network', 'False')
    vset('work', 'netvm', ''); vset('work', 'netvm', 'sys-firewall')
    vreset('work', 'netvm')
    fset('sys-net', 'ipv6', '1'); fdel('sys-net', 'ipv6')
    vset('sys-net', 'ip', '10.137.0.50'); vreset('sys-net', 'ip')
    fset('work', 'servicevm', '1'); fdel('work', 'servicevm')
    # checks of a running qube
    vset('work', 'template', 'fedora-41'); vset('work', 'kernel', '5.0')
    vset('work', 'kernel', '6.12.40-1.fc41')
    vset('work', 'maxmem', '4000'); vset('work', 'maxmem', '5000')
    vset('work', 'virt_mode', 'hvm'); vset('work', 'vcpus', '3'); vset('work', 'memory', '500')
    vreset('work', 'vcpus'); vreset('work', 'memory'); vreset('work', 'virt_mode')
    vset('work', 'guivm', 'sys-net'); vreset('work', 'guivm')
    vset('work', 'keyboard_layout', 'de++'); vreset('work', 'keyboard_layout')
    vset('fedora-41', 'template_for_dispvms', 'True'); vreset('fedora-41', 'template_for_dispvms')
    # pause, twice, and what a paused qube does with its netvm
    run('admin.vm.Pause', 'work'); run('admin.vm.Pause', 'work')
    run('admin.vm.CurrentState', 'work')
    vset('work', 'netvm', 'sys-net'); run('admin.vm.feature.Get', 'work', 'deferred-netvm-original')
    vset('work', 'netvm', 'sys-firewall')
    run('admin.vm.Unpause', 'work'); run('admin.vm.Unpause', 'work')
    run('admin.vm.feature.Get', 'work', 'deferred-netvm-original')
    run('admin.vm.Pause', 'work'); vreset('work', 'netvm'); run('admin.vm.Unpause', 'work')
    run('admin.vm.Pause', 'sys-net'); run('admin.vm.Pause', 'sys-net')
    run('admin.vm.Unpause', 'sys-net')
    run('admin.vm.Pause', 'untrusted'); run('admin.vm.Unpause', 'untrusted')
    run('admin.vm.Kill', 'work')
    vset('work', 'netvm', 'untrusted'); vreset('work', 'netvm')
    vreset('untrusted', 'provides_network')
    run('admin.vm.Kill', 'sys-firewall'); run('admin.vm.Kill', 'sys-net')
    run('admin.vm.Kill', 'sys-net')
    # last: qubesd resets default_kernel, which has no default, then crashes saving,
    # and every later save too (deviations.txt)
    greset('default_kernel'); run('admin.property.Get', 'dom0', 'default_kernel')

def create():
    # what a creation refuses, and what a new qube announces and inherits
    for cls, arg, payload in [('AppVM', 'fedora-41', 'name=probe1 label=red'),
                              ('AppVM', 'fedora-41', 'name=probe1 label=red'),
                              ('AppVM', 'fedora-41', 'name=probe2 label=nope'),
                              ('AppVM', 'fedora-41', 'name=probe2'),
                              ('AppVM', 'fedora-41', 'label=red'),
                              ('AppVM', 'fedora-41', 'name=Probe2 label=red name=x'),
                              ('AppVM', 'fedora-41', 'name=-probe label=red'),
                              ('AppVM', 'fedora-41', 'name=dom0 label=red'),
                              ('AppVM', 'fedora-41', 'name=probe2 label=red x=y'),
                              ('AppVM', 'work', 'name=probe2 label=red'),
                              ('AppVM', 'nosuch', 'name=probe2 label=red'),
                              ('AppVM', '', 'name=probe2 label=red'),
                              ('TemplateVM', 'fedora-41', 'name=probe2 label=red'),
                              ('TemplateVM', '', 'name=probet label=blue'),
                              ('StandaloneVM', '', 'name=probe3 label=green'),
                              ('StandaloneVM', 'fedora-41', 'name=probe4 label=green'),
                              ('DispVM', 'default-dvm', 'name=probe5 label=red'),
                              ('AdminVM', '', 'name=probe6 label=red'),
                              ('NoSuchVM', '', 'name=probe6 label=red')]:
        run('admin.vm.Create.' + cls, 'dom0', arg, payload)
    for vm in ['probe1', 'probet', 'probe3', 'probe4']:
        run('admin.vm.property.GetAll', vm)
        run('admin.vm.tag.List', vm); run('admin.vm.feature.List', vm)
    # a creator's features: tags and GUI qube of what it creates
    fset('dom0', 'tag-created-vm-with', 'x1 x2 x1'); fset('dom0', 'set-created-guivm', 'sys-net')
    run('admin.vm.Create.AppVM', 'dom0', 'fedora-41', b'name=probe7 label=red')
    run('admin.vm.tag.List', 'probe7'); vget('probe7', 'guivm')
    fset('dom0', 'set-created-guivm', 'nosuch')
    run('admin.vm.Create.AppVM', 'dom0', 'fedora-41', b'name=probe8 label=red')
    run('admin.vm.tag.List', 'probe8')
    fdel('dom0', 'tag-created-vm-with'); fdel('dom0', 'set-created-guivm')
    # a second template: what a template change re-announces
    fset('probet', 'boot-mode.kernelopts.debug', 'debug=1'); vset('probet', 'appvm_default_bootmode', 'debug')
    vset('probet', 'kernelopts', 'quiet'); vset('probet', 'memory', '99999999999999999999')
    vset('probe1', 'template', 'probet'); vget('probe1', 'bootmode'); vget('probe1', 'kernelopts')
    vget('probe1', 'memory'); vget('probe1', 'maxmem')
    vset('probet', 'appvm_default_bootmode', 'default'); vreset('probet', 'kernelopts')
    vset('probe1', 'template', 'fedora-41'); vreset('probe1', 'template')
    vset('probe1', 'template', 'probe1'); vset('probet', 'template', 'fedora-41')
    gset('default_template', 'probet'); gset('default_template', 'probe1'); greset('default_template')
    vset('probe1', 'default_dispvm', 'probet'); vset('probet', 'template_for_dispvms', 'True')
    vset('probe1', 'default_dispvm', 'probet'); vset('probet', 'template_for_dispvms', 'False')
    vreset('probe1', 'default_dispvm'); vset('probet', 'template_for_dispvms', 'False')
    # removal refused while in use, then done
    run('admin.vm.Remove', 'probet')
    for vm in ['probe1', 'probe7', 'probe8', 'probe3', 'probe4', 'probet', 'probe2']:
        run('admin.vm.Remove', vm)
    run('admin.vm.Remove', 'dom0'); run('admin.vm.Remove', 'fedora-41')

{'ints': ints, 'scenarios': lambda: (halted(), running()), 'create': create}[sys.argv[2]]()
