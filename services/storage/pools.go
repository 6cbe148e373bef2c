package storage

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// drivers in qubesd's entry-point order (admin.pool.ListDrivers).
var drivers = []Driver{
	simDriver{name: "callback", params: []Param{{"conf_id", true}}},
	fileDriver{name: "file"},
	fileDriver{name: "file-reflink"},
	kernelDriver{},
	simDriver{name: "lvm_thin", params: []Param{{"revisions_to_keep", false}, {"volume_group", true}, {"thin_pool", true}, {"ephemeral_volatile", false}}},
	simDriver{name: "zfs", params: []Param{{"revisions_to_keep", false}, {"container", true}, {"ephemeral_volatile", false}, {"snap_on_start_forensics", false}}},
}

func driverByName(name string) (Driver, bool) {
	for _, d := range drivers {
		if d.Name() == name {
			return d, true
		}
	}
	return nil, false
}

// poolClass is the Python class in the repr qubesd shows for a pool in use.
var poolClass = map[string]string{
	"callback": "qubes.storage.callback.CallbackPool", "file": "qubes.storage.file.FilePool",
	"file-reflink": "qubes.storage.reflink.ReflinkPool", "linux-kernel": "qubes.storage.kernels.LinuxKernel",
	"lvm_thin": "qubes.storage.lvm.ThinPool", "zfs": "qubes.storage.zfs.ZFSPool",
}

// errNoPool is enforce_arg's refusal of an unknown pool.
var errNoPool = qerr.PermissionDenied("Argument not in " + qerr.Repr("pools"))

// poolsView is a copy of the pool configurations.
func (s *Service) poolsView() []config.Pool {
	var out []config.Pool
	s.rep.View(func(c *config.Config) {
		out = make([]config.Pool, len(c.Pools))
		for i, p := range c.Pools {
			out[i] = config.Pool{Attrs: slices.Clone(p.Attrs)}
		}
	})
	return out
}

func findPool(pools []config.Pool, name string) (config.Pool, bool) {
	for _, p := range pools {
		if p.Name() == name {
			return p, true
		}
	}
	return config.Pool{}, false
}

func (s *Service) poolList(context.Context, *rpc.Call) ([]byte, error) {
	var names []string
	for _, p := range s.poolsView() {
		names = append(names, p.Name())
	}
	return lines(names), nil
}

func (s *Service) poolListDrivers(context.Context, *rpc.Call) ([]byte, error) {
	var b strings.Builder
	for _, d := range drivers {
		b.WriteString(d.Name())
		for _, p := range d.Params() {
			b.WriteString(" " + p.Name)
		}
		b.WriteByte('\n')
	}
	return []byte(b.String()), nil
}

// openArg opens the pool the argument names.
func (s *Service) openArg(c *rpc.Call) (Pool, []config.Pool, error) {
	pools := s.poolsView()
	pc, ok := findPool(pools, c.Arg)
	if !ok {
		return nil, nil, errNoPool
	}
	p, err := s.pool(pc)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return p, pools, nil
}

func (s *Service) poolInfo(ctx context.Context, c *rpc.Call) ([]byte, error) {
	p, pools, err := s.openArg(c)
	if err == nil {
		err = s.syncSim(ctx)
	}
	if err != nil {
		return nil, err
	}
	cfg := slices.Clone(p.Config())
	sort.SliceStable(cfg, func(i, j int) bool { return cfg[i].Key < cfg[j].Key })
	var b strings.Builder
	for _, kv := range cfg {
		fmt.Fprintf(&b, "%s=%s\n", kv.Key, kv.Value)
	}
	if size, used, ok := p.Usage(); ok {
		fmt.Fprintf(&b, "size=%d\nusage=%d\n", size, used)
	}
	if in := s.includedIn(c.Arg, p, pools); in != "" {
		fmt.Fprintf(&b, "included_in=%s\n", in)
	}
	return []byte(b.String()), nil
}

// includedIn is the first other pool whose directory holds this pool's
// (qubesd's search_pool_containing_dir), or "".
func (s *Service) includedIn(name string, p Pool, pools []config.Pool) string {
	dir := p.DirPath()
	if dir == "" {
		return ""
	}
	for _, pc := range pools {
		if pc.Name() == name {
			continue
		}
		other, err := s.pool(pc)
		if err != nil || other.DirPath() == "" {
			continue
		}
		od := filepath.Clean(other.DirPath())
		if od == dir || od == "/" || strings.HasPrefix(dir, od+"/") {
			return pc.Name()
		}
	}
	return ""
}

func (s *Service) poolUsageDetails(ctx context.Context, c *rpc.Call) ([]byte, error) {
	p, _, err := s.openArg(c)
	if err == nil {
		err = s.syncSim(ctx)
	}
	if err != nil {
		return nil, err
	}
	size, used, ok := p.Usage()
	if !ok {
		return nil, nil
	}
	return fmt.Appendf(nil, "data_size=%d\ndata_usage=%d\n", size, used), nil
}

// poolVolumeList lists the vids of a pool: its qubes' volumes in qubesd's load order
// (templates first, then the rest in document order), then any it lists itself.
func (s *Service) poolVolumeList(_ context.Context, c *rpc.Call) ([]byte, error) {
	p, _, err := s.openArg(c)
	if err != nil {
		return nil, err
	}
	if listed := p.Listed(); listed != nil {
		return lines(listed), nil
	}
	var vids []string
	for _, dv := range s.allVolumes(true) {
		if dv.vol.Pool == c.Arg {
			vids = append(vids, dv.vol.VID)
		}
	}
	return lines(vids), nil
}

// domainVolume is one volume of one qube.
type domainVolume struct {
	qube string
	vol  Volume
}

// allVolumes returns every qube's volumes; loadOrder puts templates first.
func (s *Service) allVolumes(loadOrder bool) []domainVolume {
	var tmpl, rest []domainVolume
	s.rep.View(func(c *config.Config) {
		for i := range c.Domains {
			d := &c.Domains[i]
			vols, err := parseVolumeConfig(d.VolumeConfig)
			if err != nil {
				s.log.Warn("unreadable volume config", "qube", d.Name(), "err", err)
				continue
			}
			for _, v := range vols {
				dv := domainVolume{qube: d.Name(), vol: v}
				if loadOrder && d.Class == "TemplateVM" {
					tmpl = append(tmpl, dv)
				} else {
					rest = append(rest, dv)
				}
			}
		}
	})
	return append(tmpl, rest...)
}

// splitLines is Python's str.splitlines for ASCII text.
func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\n', '\r', '\x0b', '\x0c', '\x1c', '\x1d', '\x1e':
			out = append(out, s[start:i])
			if s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n' {
				i++
			}
			start = i + 1
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c > 0x7f {
			return false
		}
	}
	return true
}

func allIn(s, set string) bool {
	for i := 0; i < len(s); i++ {
		if !strings.ContainsRune(set, rune(s[i])) {
			return false
		}
	}
	return true
}

const (
	letters   = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
	digits    = "0123456789"
	poolChars = letters + digits + "-_."
)

// poolAdd is admin.pool.Add, its checks in qubesd's order.
func (s *Service) poolAdd(ctx context.Context, c *rpc.Call) ([]byte, error) {
	drv, ok := driverByName(c.Arg)
	if !ok {
		return nil, qerr.PermissionDenied("Argument not in " + qerr.Repr("available drivers"))
	}
	if !isASCII(c.Payload) {
		return nil, qerr.ProtocolError("Pool parameters contains non-ASCII characters")
	}
	var opts PoolConfig
	for _, line := range splitLines(string(c.Payload)) {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, qerr.ProtocolError("Options must be separated by equal sign")
		}
		opts = append(opts, KV{k, v})
	}
	seen := map[string]bool{}
	for _, kv := range opts {
		if seen[kv.Key] {
			return nil, qerr.ProtocolError("Options must be unique")
		}
		seen[kv.Key] = true
	}
	name, ok := opts.Get("name")
	if !ok {
		return nil, qerr.ProtocolError("Pool configuration must contain key: name")
	}
	if !allIn(name, poolChars) {
		return nil, qerr.ProtocolError("Pool name must be in safe set: " + poolChars)
	}
	params := map[string]bool{}
	for _, p := range drv.Params() {
		params[p.Name] = true
	}
	for _, kv := range opts {
		if kv.Key != "name" && !params[kv.Key] {
			return nil, qerr.ProtocolError("Unexpected driver options found")
		}
	}
	var missing []string
	for _, p := range drv.Params() {
		if _, ok := opts.Get(p.Name); p.Required && !ok {
			missing = append(missing, p.Name)
		}
	}
	if len(missing) > 0 {
		return nil, qerr.QubesException("missing required driver options: " + strings.Join(missing, " "))
	}
	if name == "" {
		// qubesd would add a pool without a name; qubes.xml could not hold it.
		return nil, qerr.Abort("pool without a name")
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	rev := s.rep.Revision()
	if _, exists := findPool(s.poolsView(), name); exists {
		return nil, qerr.PoolInUseError("Storage pool is in use: " + qerr.Repr(name))
	}
	cfg := append(PoolConfig{{"name", name}, {"driver", drv.Name()}}, opts...)
	p, err := drv.Open(cfg, s.host)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if err := p.Setup(ctx); err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	pc := config.Pool{}
	for _, kv := range p.Config() {
		pc.Attrs = append(pc.Attrs, config.Attr{Name: kv.Key, Value: kv.Value})
	}
	if err := s.apply(ctx, rev, []config.Op{{Kind: config.OpAddPool, Pool: &pc}}); err != nil {
		return nil, err
	}
	if err := s.publish(ctx, cloudevent.New("", "pool-add", "pool", name)); err != nil {
		return nil, err
	}
	return nil, nil
}

// poolRemove is admin.pool.Remove: refused while a volume or a default_pool* global
// uses the pool.
func (s *Service) poolRemove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	rev := s.rep.Revision()
	p, _, err := s.openArg(c)
	if err != nil {
		return nil, err
	}
	for _, dv := range s.allVolumes(false) {
		if dv.vol.Pool == c.Arg {
			drv, _ := poolDriver(p)
			return nil, qerr.PoolInUseError(fmt.Sprintf("Storage pool is in use: <%s object at 0x%x>", poolClass[drv], poolAddr(c.Arg)))
		}
	}
	var inUse string
	s.rep.View(func(cf *config.Config) {
		m := model.New(cf, model.DefaultHost, nil)
		for _, suffix := range []string{"", "_kernel", "_private", "_root", "_volatile"} {
			if v, ok := m.Value(model.Global, "default_pool"+suffix); ok && v.Text == c.Arg && inUse == "" {
				inUse = "default_pool" + suffix
			}
		}
	})
	if inUse != "" {
		return nil, qerr.PoolInUseError("Storage pool is in use: set as " + inUse)
	}
	if err := s.publish(ctx, cloudevent.New("", "pool-pre-delete", "pool", c.Arg)); err != nil {
		return nil, err
	}
	if err := s.apply(ctx, rev, []config.Op{{Kind: config.OpDelPool, Name: c.Arg}}); err != nil {
		return nil, err
	}
	if err := p.Destroy(ctx); err != nil {
		s.log.Warn("destroy removed pool", "pool", c.Arg, "err", err)
	}
	s.pmu.Lock()
	delete(s.pools, c.Arg)
	s.pmu.Unlock()
	if err := s.publish(ctx, cloudevent.New("", "pool-delete", "pool", c.Arg)); err != nil {
		return nil, err
	}
	return nil, nil
}

func poolDriver(p Pool) (string, bool) { return p.Config().Get("driver") }

// poolAddr stands for the memory address in a pool's Python repr: stable per name.
func poolAddr(name string) uint64 {
	h := uint64(0x7f0000000000)
	for i := 0; i < len(name); i++ {
		h = h*131 + uint64(name[i])
	}
	return 0x7f0000000000 | h&0xffffffff0
}

// validateNumber is qubesd's validate_number: ASCII digits, under 20 of them, no
// leading zero, an optional '-' where allowed. Numbers beyond int64 abort, as the
// operation they would reach fails unhandled in qubesd.
func validateNumber(b []byte, name string, allowNegative bool) (int64, error) {
	neg := false
	if allowNegative && len(b) > 0 && b[0] == '-' {
		neg, b = true, b[1:]
	}
	cap := strings.ToUpper(name[:1]) + strings.ToLower(name[1:])
	if len(b) == 0 || !allIn(string(b), digits) {
		return 0, qerr.ProtocolError(cap + " contains non ASCII digits")
	}
	if len(b) >= 20 {
		return 0, qerr.ProtocolError(cap + " is bigger than 19 decimal digits")
	}
	if b[0] == '0' && len(b) > 1 {
		return 0, qerr.ProtocolError(cap + " contains spurious leading zeros")
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return 0, qerr.Abort(name + " out of range")
	}
	if neg {
		n = -n
	}
	return n, nil
}

// setPoolAttr changes one attribute of the pool the argument names.
func (s *Service) setPoolAttr(ctx context.Context, c *rpc.Call, check func(p Pool) (key, value string, err error)) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	rev := s.rep.Revision()
	pools := s.poolsView()
	pc, ok := findPool(pools, c.Arg)
	if !ok {
		return nil, errNoPool
	}
	p, err := s.pool(pc)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	key, value, err := check(p)
	if err != nil || key == "" {
		return nil, err
	}
	np := config.Pool{Attrs: slices.Clone(pc.Attrs)}
	if i := slices.IndexFunc(np.Attrs, func(a config.Attr) bool { return a.Name == key }); i >= 0 {
		np.Attrs[i].Value = value
	} else {
		np.Attrs = append(np.Attrs, config.Attr{Name: key, Value: value})
	}
	if err := s.apply(ctx, rev, []config.Op{{Kind: config.OpSetPool, Pool: &np}}); err != nil {
		return nil, err
	}
	return nil, nil
}

func (s *Service) poolSetRevisions(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if _, ok := findPool(s.poolsView(), c.Arg); !ok {
		return nil, errNoPool
	}
	n, err := validateNumber(c.Payload, "revisions to keep", true)
	if err != nil {
		return nil, err
	}
	if n < -1 {
		return nil, qerr.ProtocolError("Value can't be lower than -1")
	}
	return s.setPoolAttr(ctx, c, func(p Pool) (string, string, error) {
		if _, ok := p.(*kernelPool); ok {
			if n != 0 {
				return "", "", qerr.ValueError("LinuxKernel supports only revisions_to_keep=0")
			}
			return "", "", nil
		}
		return "revisions_to_keep", strconv.FormatInt(n, 10), nil
	})
}

func (s *Service) poolSetEphemeral(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if _, ok := findPool(s.poolsView(), c.Arg); !ok {
		return nil, errNoPool
	}
	b, err := payloadBool(c.Payload)
	if err != nil {
		return nil, err
	}
	return s.setPoolAttr(ctx, c, func(p Pool) (string, string, error) {
		if _, ok := p.(*kernelPool); ok {
			return "", "", nil // not part of a kernel pool's configuration
		}
		return "ephemeral_volatile", pyBool(b), nil
	})
}

// payloadBool parses a bool payload (qubes.property.bool of the ASCII text).
func payloadBool(p []byte) (bool, error) {
	if !isASCII(p) {
		return false, qerr.ProtocolError("Payload is not boolean ASCII")
	}
	b, err := parseBool(string(p))
	if err != nil {
		return false, qerr.ProtocolError("Payload is not boolean ASCII")
	}
	return b, nil
}

// parseBool is qubesd's bool text.
func parseBool(s string) (bool, error) {
	b, err := model.ParseBool(s)
	if err != nil {
		return false, errors.New("not a bool")
	}
	return b, nil
}
