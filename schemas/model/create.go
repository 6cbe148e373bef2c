package model

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// CreateRequest is an admin.vm.Create.‹Class› or admin.vm.CreateInPool.‹Class› call.
type CreateRequest struct {
	Class   string
	InPool  bool
	Arg     string // template name, or ""
	Payload []byte
	Source  string // calling qube
	UUID    string // for the new qube (random v4; the model draws no randomness)
	// DispID draws a random number below n (new DispVMs get a random dispid).
	DispID func(n int) int
}

var volumeNames = []string{"root", "private", "volatile", "kernel"}

// Create plans the creation of a qube (docs/spec/methods.md §1.1).
func (m *Model) Create(req CreateRequest) (*Change, error) {
	hasTemplate := HasProperty(req.Class, "template")
	kwargs := map[string]string{}
	templateExists := false
	if req.Arg != "" {
		if !hasTemplate {
			return nil, qerr.ProtocolError(req.Class + " cannot be based on template")
		}
		if m.Domain(req.Arg) != nil {
			templateExists = true
			kwargs["template"] = req.Arg
		}
	}
	if !isASCII(req.Payload) {
		return nil, qerr.ProtocolError("Parameters contains non-ASCII characters")
	}
	pool := ""
	volPools := map[string]string{}
	var poolErr error
	checkPool := func(name string) {
		if poolErr == nil && !m.PoolExists(name) {
			poolErr = qerr.QubesException("Unknown storage pool " + name)
		}
	}
	for _, item := range strings.Split(string(req.Payload), " ") {
		key, value, ok := strings.Cut(item, "=")
		if !ok {
			return nil, qerr.Abort("create parameter without '='")
		}
		if _, dup := kwargs[key]; dup {
			return nil, qerr.ProtocolError("Options must be unique")
		}
		switch {
		case key == "name":
			if err := ValidateName(value); err != nil {
				return nil, err
			}
			kwargs["name"] = value
		case key == "label":
			if err := ValidateLabelName(value, true); err != nil {
				return nil, err
			}
			if l := m.LookupLabel(value); l != nil {
				kwargs["label"] = l.Name
			}
		case (key == "pool" || strings.HasPrefix(key, "pool:")) && !req.InPool:
			return nil, qerr.ProtocolError("Pool option specified but 'allow_pool' is False")
		case key == "pool":
			if pool != "" {
				return nil, qerr.ProtocolError("Option 'pool' must be unique")
			}
			checkPool(value)
			pool = value
		case strings.HasPrefix(key, "pool:"):
			vol := key[len("pool:"):]
			if !contains(volumeNames, vol) {
				return nil, qerr.ProtocolError("Volume must be one of: root, private, volatile, kernel")
			}
			if _, dup := volPools[vol]; dup {
				return nil, qerr.ProtocolError("Option 'pool:" + vol + "' must be unique")
			}
			checkPool(value)
			volPools[vol] = value
		default:
			return nil, qerr.ProtocolError("Options does not match: name, label, pool, pool:")
		}
	}
	if _, ok := kwargs["name"]; !ok {
		return nil, qerr.ProtocolError("Creation requested without key: name")
	}
	if _, ok := kwargs["label"]; !ok {
		return nil, qerr.ProtocolError("Creation requested without key: label")
	}
	if pool != "" && len(volPools) > 0 {
		return nil, qerr.ProtocolError("Conflicting options specified: 'pool=', 'pool:volume='")
	}
	name := kwargs["name"]
	if m.Domain(name) != nil {
		return nil, qerr.VMAlreadyExistsError("Qube already exists: " + name)
	}
	if req.Arg != "" && !templateExists {
		return nil, qerr.VMNotFoundError("No such domain: " + qerr.Repr(req.Arg))
	}
	if poolErr != nil {
		return nil, poolErr
	}
	if req.Class == "AdminVM" {
		return nil, propErr("property 'qid' on AdminVM instance cannot be set")
	}
	if pool != "" {
		// pool= moves only the volumes the qube owns and writes: not the snapshots
		// of its template's volumes, nor the read-only kernel.
		for _, v := range volumeNames {
			if v != "kernel" && !snapshotVolume(req.Class, v) {
				volPools[v] = pool
			}
		}
	}
	var storageErr error
	for _, v := range volumeNames {
		if p, ok := volPools[v]; ok && snapshotVolume(req.Class, v) {
			storageErr = qerr.QubesException("Snapshot volume " + v + " must be in the same pool as its origin (" +
				v + " volume of template),cannot move to pool " + p + " ")
			break
		}
	}
	d := &config.Domain{Class: req.Class}
	props := []config.Property{{Name: "label", Value: kwargs["label"]}, {Name: "name", Value: name}}
	if hasTemplate {
		tmpl := kwargs["template"]
		if tmpl == "" {
			def := "default_template"
			if req.Class == "DispVM" {
				def = "default_dispvm"
			}
			if v, ok := m.Value(Global, def); ok && !v.None {
				tmpl = v.Text
			}
		}
		if tmpl == "" {
			return nil, qerr.ValueError("Template for the qube not specified, nor default template set.")
		}
		t := m.Domain(tmpl)
		switch {
		case req.Class == "AppVM" && t.Class != "TemplateVM":
			return nil, propErr("wrong VM class: domains[" + m.Repr(Holder{D: t}) + "] is of type " + t.Class + " and not TemplateVM")
		case req.Class == "DispVM" && !m.templateForDispVMs(t):
			return nil, qerr.ValueError("template for disposable (" + tmpl + ") needs to be an AppVM with template_for_dispvms=True")
		}
		props = append(props, config.Property{Name: "template", Value: tmpl})
	}
	qid := m.freeQID()
	if qid == 0 {
		return nil, qerr.QubesException("No unused qube id left")
	}
	d.ID = "domain-" + strconv.Itoa(qid)
	props = append(props, config.Property{Name: "qid", Value: strconv.Itoa(qid)}, config.Property{Name: "uuid", Value: req.UUID})
	if req.Class == "DispVM" {
		props = append(props, config.Property{Name: "dispid", Value: strconv.Itoa(m.freeDispID(req.DispID))})
	}
	d.Properties = props
	ch, err := m.addDomain(d, req.Source, volPools, false)
	if err != nil || storageErr == nil {
		return ch, err
	}
	// Storage creation fails after the qube was added (and tagged): qubesd removes it
	// again and returns the error; nothing is saved.
	var evs []Event
	for _, e := range ch.Post {
		if e.Name == "domain-create-on-disk" {
			break
		}
		evs = append(evs, e)
	}
	evs = append(evs, Ev("", "domain-pre-delete", "vm", name), Ev("", "domain-delete", "vm", name))
	return &Change{Pre: evs, Err: storageErr}, nil
}

// snapshotVolume reports whether a new qube's volume is a snapshot of its template's
// (root of qubes based on a template; also private of disposables).
func snapshotVolume(class, vol string) bool {
	switch class {
	case "AppVM":
		return vol == "root"
	case "DispVM":
		return vol == "root" || vol == "private"
	}
	return false
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// freeQID is the lowest unused qid in 1…9999 (0: none left).
func (m *Model) freeQID() int {
	used := map[int]bool{}
	for i := range m.C.Domains {
		used[m.qid(&m.C.Domains[i])] = true
	}
	for q := 1; q <= 9999; q++ {
		if !used[q] {
			return q
		}
	}
	return 0
}

// freeDispID draws an unused dispid in 0…9999.
func (m *Model) freeDispID(draw func(int) int) int {
	used := map[int]bool{}
	for i := range m.C.Domains {
		if v, ok := m.C.Domains[i].Property("dispid"); ok {
			n, _ := strconv.Atoi(v)
			used[n] = true
		}
	}
	if draw != nil {
		for range 100 {
			if n := draw(10000); !used[n] {
				return n
			}
		}
	}
	for n := range 10000 {
		if !used[n] {
			return n
		}
	}
	return 0
}

// addDomain finishes a new qube (tags and features its constructor and extensions
// add, storage) and plans its addition.
func (m *Model) addDomain(d *config.Domain, source string, volPools map[string]string, disposable bool) (*Change, error) {
	name := d.Name()
	// The new qube is evaluated against the configuration as it will be.
	next := &config.Config{Labels: m.C.Labels, Pools: m.C.Pools, Properties: m.C.Properties,
		Domains: append(append([]config.Domain(nil), m.C.Domains...), *d)}
	nm := New(next, m.Host, nil)
	nd := nm.Domain(name)
	h := Holder{D: nd}
	var tags []string
	addTag := func(t string) { tags = appendMissing(tags, t) }
	if HasProperty(d.Class, "guivm") {
		for _, p := range []string{"guivm", "audiovm"} {
			if v, ok := nm.Value(h, p); ok && !v.None {
				addTag(p + "-" + v.Text)
			}
		}
	}
	if !nm.Bool(Global, "check_updates_vm") && !disposable {
		if _, ok := Feature(d, "check-updates"); !ok {
			d.Features = append(d.Features, config.Feature{Name: "check-updates", Value: ""})
		}
	}
	d.Tags = appendMissing(d.Tags, tags...)
	nd.Tags, nd.Features = d.Tags, d.Features

	// The created-by tag's handlers run before the tag's own event: the creator's
	// tag-created-vm-with tags, then its set-created-guivm as the new qube's guivm.
	createdBy := "created-by-" + source
	var byEvents []Event
	var byOps []config.Op
	if src := m.Domain(source); src != nil {
		by := &Change{}
		if err := nm.createdBySide(by, nd, src); err != nil {
			return nil, err
		}
		byEvents, byOps = by.Post, by.Ops
	}
	if err := applyToNew(d, byOps); err != nil {
		return nil, err
	}
	nd.Properties, nd.Tags = d.Properties, d.Tags
	d.VolumeConfig = nm.volumeConfig(nd, volPools)

	ch := &Change{}
	evs := []Event{Ev("", "domain-add", "vm", name)}
	if !disposable {
		evs = append(append(evs, byEvents...),
			Ev(name, "domain-tag-add:"+createdBy, "tag", createdBy),
			Ev(name, "domain-create-on-disk"))
		d.Tags = appendMissing(d.Tags, createdBy)
	} else {
		dispBy := "disp-created-by-" + source
		evs = append(append(append(evs, Ev(name, "domain-create-on-disk")), byEvents...),
			Ev(name, "domain-tag-add:"+createdBy, "tag", createdBy),
			Ev(name, "domain-tag-add:"+dispBy, "tag", dispBy))
		d.Tags = appendMissing(d.Tags, createdBy, dispBy)
	}
	ch.Ops = []config.Op{{Kind: config.OpAddDomain, New: d}}
	ch.Post = evs
	return ch, nil
}

// applyToNew applies the property and tag ops of the created-by handlers to the new
// qube before it is added.
func applyToNew(d *config.Domain, ops []config.Op) error {
	for _, op := range ops {
		switch op.Kind {
		case config.OpSetProperty:
			d.Properties = append(slices.DeleteFunc(d.Properties, func(p config.Property) bool { return p.Name == op.Name }),
				config.Property{Name: op.Name, Value: op.Value})
		case config.OpAddTag:
			d.Tags = appendMissing(d.Tags, op.Name)
		case config.OpDelTag:
			d.Tags = slices.DeleteFunc(d.Tags, func(t string) bool { return t == op.Name })
		default:
			return fmt.Errorf("created-by handlers: unexpected %s on a new qube", op.Kind)
		}
	}
	return nil
}

func appendMissing(list []string, items ...string) []string {
	for _, t := range items {
		if !contains(list, t) {
			list = append(list, t)
		}
	}
	return list
}

// volumeConfig writes the <volume-config> of a new qube the way qubesd lays out its
// volumes in the file pool.
func (m *Model) volumeConfig(d *config.Domain, pools map[string]string) config.RawXML {
	if d.Class == "AdminVM" || d.Class == "RemoteVM" {
		return ""
	}
	name := d.Name()
	poolOf := func(vol string) string {
		if p := pools[vol]; p != "" {
			return p
		}
		v, _ := m.Value(Global, "default_pool_"+vol)
		return v.Text
	}
	dir := "appvms/" + name
	if d.Class == "TemplateVM" {
		dir = "vm-templates/" + name
	}
	tmpl := m.Template(d)
	if d.Class == "DispVM" && tmpl != nil {
		tmpl = m.Template(tmpl) // the root comes from the disposable template's template
	}
	var b strings.Builder
	b.WriteString("<volume-config>\n")
	vol := func(attrs ...string) {
		b.WriteString("  <volume")
		for i := 0; i+1 < len(attrs); i += 2 {
			fmt.Fprintf(&b, " %s=%q", attrs[i], attrs[i+1])
		}
		b.WriteString("/>\n")
	}
	// revisions_to_keep of a new volume is its pool's (init_volume of the reflink,
	// file and thin drivers); the file driver keeps none of a volume it does not
	// save, a kernel pool none at all.
	rtk := func(vol string, saveOnStop bool) string {
		for _, p := range m.C.Pools {
			if p.Name() != poolOf(vol) {
				continue
			}
			drv, _ := p.Attr("driver")
			switch {
			case drv == "linux-kernel", drv == "file" && !saveOnStop:
				return "0"
			}
			if v, ok := p.Attr("revisions_to_keep"); ok {
				return v
			}
		}
		return "1"
	}
	rootSize := "10737418240"
	if tmpl != nil {
		vol("name", "root", "pool", poolOf("root"), "vid", dir+"/root", "revisions_to_keep", rtk("root", false), "rw", "True",
			"save_on_stop", "False", "snap_on_start", "True", "size", rootSize, "source", "vm-templates/"+tmpl.Name()+"/root")
	} else {
		vol("name", "root", "pool", poolOf("root"), "vid", dir+"/root", "revisions_to_keep", rtk("root", true), "rw", "True",
			"save_on_stop", "True", "snap_on_start", "False", "size", rootSize)
	}
	if d.Class == "DispVM" {
		dvm := m.Template(d)
		src := ""
		if dvm != nil {
			src = "appvms/" + dvm.Name() + "/private"
		}
		vol("name", "private", "pool", poolOf("private"), "vid", dir+"/private", "revisions_to_keep", rtk("private", false), "rw", "True",
			"save_on_stop", "False", "snap_on_start", "True", "size", "2147483648", "source", src)
	} else {
		vol("name", "private", "pool", poolOf("private"), "vid", dir+"/private", "revisions_to_keep", rtk("private", true), "rw", "True",
			"save_on_stop", "True", "snap_on_start", "False", "size", "2147483648")
	}
	vol("name", "volatile", "pool", poolOf("volatile"), "vid", dir+"/volatile", "revisions_to_keep", rtk("volatile", false), "rw", "True",
		"save_on_stop", "False", "snap_on_start", "False", "size", "10737418240")
	if k, ok := m.Value(Holder{D: d}, "kernel"); ok && k.String() != "" {
		vol("name", "kernel", "pool", poolOf("kernel"), "vid", k.Text, "revisions_to_keep", "0", "rw", "False",
			"save_on_stop", "False", "snap_on_start", "False")
	}
	b.WriteString("</volume-config>")
	return config.RawXML(b.String())
}

// DisposableRequest is an admin.vm.CreateDisposable call.
type DisposableRequest struct {
	Source  string
	Dest    string
	Arg     string
	Payload []byte
	UUID    string
	DispID  func(n int) int
}

// CreateDisposable plans admin.vm.CreateDisposable (docs/spec/methods.md §1.2).
func (m *Model) CreateDisposable(req DisposableRequest) (*Change, error) {
	if req.Arg != "" && req.Arg != "preload" {
		return nil, qerr.PermissionDenied(`Argument not in "'', 'preload'"`)
	}
	payload := string(req.Payload)
	if payload != "" && payload != "uuid" {
		return nil, qerr.ProtocolError("Invalid payload, expected empty string or 'uuid'")
	}
	var base *config.Domain
	if dest := m.Domain(req.Dest); dest != nil && dest.Class != "AdminVM" {
		base = dest
	} else if src := m.Domain(req.Source); src != nil && HasProperty(src.Class, "default_dispvm") {
		base = m.Ref(Holder{D: src}, "default_dispvm")
	}
	if !m.templateForDispVMs(base) {
		return nil, qerr.QubesException("Refusing to create disposable out of app qube which has template_for_dispvms=False")
	}
	if req.Arg == "preload" {
		return &Change{Post: []Event{Ev(base.Name(), "domain-preload-dispvm-start", "reason", "autostart was requested")}}, nil
	}
	dispid := m.freeDispID(req.DispID)
	name := "disp" + strconv.Itoa(dispid)
	qid := m.freeQID()
	if qid == 0 || m.Domain(name) != nil {
		return nil, qerr.QubesException("No unused qube id left")
	}
	d := &config.Domain{ID: "domain-" + strconv.Itoa(qid), Class: "DispVM"}
	skip := map[string]bool{"name": true, "qid": true, "uuid": true, "dispid": true, "template": true}
	for _, p := range base.Properties {
		if !skip[p.Name] && HasProperty("DispVM", p.Name) {
			d.Properties = append(d.Properties, p)
		}
	}
	d.Properties = append(d.Properties,
		config.Property{Name: "auto_cleanup", Value: "True"},
		config.Property{Name: "dispid", Value: strconv.Itoa(dispid)},
		config.Property{Name: "name", Value: name},
		config.Property{Name: "qid", Value: strconv.Itoa(qid)},
		config.Property{Name: "uuid", Value: req.UUID},
		config.Property{Name: "template", Value: base.Name()})
	// qubesd's firewall.clone(template.firewall): the rules as the base keeps them.
	d.Firewall = base.Firewall
	for _, f := range base.Features {
		if !strings.HasPrefix(f.Name, "preload-dispvm") {
			d.Features = append(d.Features, f)
		}
	}
	d.Tags = append(d.Tags, base.Tags...)
	ch, err := m.addDomain(d, req.Source, nil, true)
	if err != nil {
		return nil, err
	}
	ch.Reply = name
	if payload == "uuid" {
		ch.Reply = "uuid:" + req.UUID
	}
	return ch, nil
}

// Remove plans admin.vm.Remove (docs/spec/methods.md §1.3).
func (m *Model) Remove(d *config.Domain) (*Change, error) {
	name := d.Name()
	if d.Class == "AdminVM" {
		return nil, qerr.VMInUseError("'dom0' cannot be removed")
	}
	if HasProperty(d.Class, "installed_by_rpm") && m.Bool(Holder{D: d}, "installed_by_rpm") {
		return nil, qerr.VMInUseError("VM installed by package manager: " + name)
	}
	if m.PowerState(name) != "Halted" {
		return nil, qerr.VMNotHaltedError("Domain is not powered off: " + qerr.Repr(name))
	}
	ch := &Change{Pre: []Event{Ev("", "domain-pre-delete", "vm", name)}}
	if m.inUse(d) {
		ch.Err = qerr.VMInUseError("Domain is in use: " + qerr.Repr(name) + ";  see 'journalctl -u qubesd -e' in dom0 for details")
		return ch, nil
	}
	if ports := m.devicesProvided(d); len(ports) > 0 {
		ch.Err = qerr.VMInUseError("VM has devices assigned to other VMs: " + strings.Join(ports, ", "))
		return ch, nil
	}
	ch.Ops = []config.Op{{Kind: config.OpDelDomain, Domain: d.ID}}
	ch.Post = []Event{Ev("", "domain-delete", "vm", name)}
	return ch, nil
}

// inUse reports whether a global qube-valued property resolves to d (defaults
// included) or any qube has a qube-valued property explicitly set to it.
func (m *Model) inUse(d *config.Domain) bool {
	for _, s := range SpecsOf(GlobalHolder) {
		if s.Kind == KindVM && m.Ref(Global, s.Name) == d {
			return true
		}
	}
	name := d.Name()
	for i := range m.C.Domains {
		o := &m.C.Domains[i]
		for _, p := range o.Properties {
			if s := SpecOf(o.Class, p.Name); s != nil && s.Kind == KindVM && p.Value == name {
				return true
			}
		}
	}
	return false
}

// devicesProvided lists the ports of devices that d backs and other qubes have assigned.
func (m *Model) devicesProvided(d *config.Domain) []string {
	var out []string
	needle := `backend-domain="` + d.Name() + `"`
	for i := range m.C.Domains {
		o := &m.C.Domains[i]
		if o == d {
			continue
		}
		for _, raw := range o.Devices {
			s := string(raw)
			for {
				at := strings.Index(s, needle)
				if at < 0 {
					break
				}
				s = s[at+len(needle):]
				id := "*"
				if j := strings.Index(s, `id="`); j >= 0 {
					rest := s[j+4:]
					if k := strings.IndexByte(rest, '"'); k >= 0 {
						id = rest[:k]
					}
				}
				out = append(out, id) // qubesd joins the assignments' port_id
			}
		}
	}
	return out
}
