package model

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// FeatureNotFound is qubesd's error for a feature a qube does not have.
func FeatureNotFound(vm, feature string) error {
	return qerr.FeatureNotFoundError("Feature not set for domain " + vm + ": " + feature)
}

// FeatureListText is feature.List's reply: names in insertion order.
func FeatureListText(d *config.Domain) string {
	var b strings.Builder
	for _, f := range d.Features {
		b.WriteString(f.Name)
		b.WriteByte('\n')
	}
	return b.String()
}

// prohibitedFeatures may not be changed through the Admin API.
var prohibitedFeatures = map[string]bool{
	"deferred-netvm-original": true, "preload-dispvm": true,
	"preload-dispvm-completed": true, "preload-dispvm-in-progress": true,
}

func featureProhibited() error {
	return qerr.PermissionDenied("changing this feature is prohibited by qubes.ext.admin.AdminExtension")
}

var (
	featureNameRe  = regexp.MustCompile(`\A[a-zA-Z0-9_.-]+\z`)
	featureValueRe = regexp.MustCompile(`\A[\x20-\x7e]*\z`)
)

// FeatureSet plans admin.vm.feature.Set.
func (m *Model) FeatureSet(d *config.Domain, name string, payload []byte) (*Change, error) {
	if !isASCII(payload) {
		return nil, qerr.ProtocolError("Feature value contains non-ASCII characters")
	}
	if !featureNameRe.MatchString(name) {
		return nil, qerr.ProtocolError("feature name contains illegal characters")
	}
	value := string(payload)
	if !featureValueRe.MatchString(value) {
		return nil, qerr.ProtocolError(name + " value contains illegal characters")
	}
	if prohibitedFeatures[name] {
		return nil, featureProhibited()
	}
	kw := []string{"feature", name, "value", value}
	old, hasOld := Feature(d, name)
	if hasOld {
		kw = append(kw, "oldvalue", old)
	}
	ch := &Change{Pre: []Event{Ev(d.Name(), "domain-feature-pre-set:"+name, kw...)}}
	if ch.Err = m.validateFeature(d, name, value, old, hasOld); ch.Err != nil {
		return ch, nil
	}
	// dom0's preload-dispvm-max handler (qubes/vm/adminvm.py) fires the same
	// pre-event, with dom0's kwargs, on the global default_dispvm, unless the value
	// is unchanged or there is no default_dispvm. That qube's handlers then run: its
	// event is streamed after dom0's, and its checks can veto dom0's change.
	// That handler passes oldvalue explicitly: None when dom0 had none.
	if d.Class == "AdminVM" && name == "preload-dispvm-max" && !(hasOld && old == value) {
		if t := m.Ref(Global, "default_dispvm"); t != nil {
			oldText := "None"
			if hasOld {
				oldText = old
			}
			ch.Pre = append(ch.Pre, Ev(t.Name(), "domain-feature-pre-set:"+name, "feature", name, "value", value, "oldvalue", oldText))
			if HasProperty(t.Class, "template_for_dispvms") {
				if ch.Err = m.preloadMaxVeto(t, value); ch.Err != nil {
					return ch, nil
				}
			}
		}
	}
	// The extensions' domain-feature-set handlers run before the event reaches a
	// subscriber. Those that check the value (vm-config, custom-persist) fail the call
	// with only the pre-event out; qubesd keeps the value in memory unsaved, here it is
	// not taken.
	if ch.Err = checkFeatureSet(name, value); ch.Err != nil {
		return ch, nil
	}
	if name == "service.meminfo-writer" {
		return m.meminfoWriterSet(d, ch, kw, value, hasOld)
	}
	ch.Ops = []config.Op{{Kind: config.OpSetFeature, Domain: d.ID, Name: name, Value: value}}
	if !(hasOld && old == value) {
		ch.Post = m.bootModeFeatureSide(d, name)
	}
	ch.Post = append(ch.Post, Ev(d.Name(), "domain-feature-set:"+name, kw...))
	if name == "preload-dispvm-max" && !(hasOld && old == value) {
		ch.Post = append(ch.Post, m.preloadStart(d, "set to "+qerr.Repr(value))...)
	}
	return ch, nil
}

// preloadStart is domain-preload-dispvm-start, which qubesd fires (from a task
// started by the domain-feature-set or -delete handler of preload-dispvm-max, so after
// that event) on the disposable template that should preload: for dom0's feature the
// global default_dispvm, for a qube's own one that qube, if it is a disposable
// template and the global feature does not rule it.
func (m *Model) preloadStart(d *config.Domain, what string) []Event {
	if d.Class == "AdminVM" {
		if t := m.Ref(Global, "default_dispvm"); t != nil {
			return []Event{Ev(t.Name(), "domain-preload-dispvm-start", "reason", "global feature was "+what)}
		}
		return nil
	}
	if !HasProperty(d.Class, "template_for_dispvms") || !m.Bool(Holder{D: d}, "template_for_dispvms") {
		return nil
	}
	if dom0 := m.AdminVM(); dom0 != nil && m.Ref(Global, "default_dispvm") == d {
		if _, ok := Feature(dom0, "preload-dispvm-max"); ok {
			return nil
		}
	}
	if what != "deleted" {
		return []Event{Ev(d.Name(), "domain-preload-dispvm-start", "reason", "local feature was "+what)}
	}
	return nil
}

// meminfoWriterSet is the services extension's compatibility handler of
// service.meminfo-writer: a true value resets maxmem, a false one sets it to 0, and
// the feature is removed again; the events of both come before domain-feature-set.
func (m *Model) meminfoWriterSet(d *config.Domain, ch *Change, kw []string, value string, hasOld bool) (*Change, error) {
	const f = "service.meminfo-writer"
	h := Holder{D: d}
	var sub *Change
	var err error
	if value != "" {
		sub, err = m.Reset(h, "maxmem")
	} else {
		sub, err = m.Set(h, "maxmem", []byte("0"))
	}
	if err == nil && sub.Err != nil {
		err = sub.Err
	}
	if err != nil {
		if sub != nil {
			ch.Pre = append(ch.Pre, sub.Pre...)
		}
		ch.Err = err
		return ch, nil
	}
	ch.Post = append(append(append(ch.Post, sub.Pre...), sub.Post...),
		Ev(d.Name(), "domain-feature-pre-delete:"+f, "feature", f),
		Ev(d.Name(), "domain-feature-delete:"+f, "feature", f),
		Ev(d.Name(), "domain-feature-set:"+f, kw...))
	ch.Ops = sub.Ops
	if hasOld {
		ch.Ops = append(ch.Ops, config.Op{Kind: config.OpDelFeature, Domain: d.ID, Name: f})
	}
	return ch, nil
}

// checkFeatureSet are the checks of the vm-config and custom-persist extensions'
// domain-feature-set handlers (qubes/ext/vm_config.py, custom_persist.py).
func checkFeatureSet(name, value string) error {
	if config, ok := strings.CutPrefix(name, "vm-config."); ok {
		switch {
		case len(config) > 52:
			return qerr.ValueError("VM config name must not exceed 46 bytes")
		case config == "":
			return qerr.ValueError("Empty config name not allowed")
		case !(config[0] >= 'a' && config[0] <= 'z' || config[0] >= 'A' && config[0] <= 'Z'):
			return qerr.ValueError("Config name must start with an ASCII letter")
		}
	}
	key, ok := strings.CutPrefix(name, "custom-persist.")
	if !ok {
		return nil
	}
	const keyMax = 63 - len("/persist/")
	switch {
	case key == "":
		return qerr.ValueError("custom-persist key cannot be empty")
	case len(key) > keyMax:
		return qerr.ValueError(fmt.Sprintf("custom-persist key is too long (max %d), ignoring: %s", keyMax, key))
	}
	if strings.HasPrefix(value, "/") {
		return nil
	}
	opts := strings.Split(value, ":")
	if len(opts) < 5 || !strings.HasPrefix(opts[4], "/") {
		return qerr.ValueError("invalid value format: '" + value + "'")
	}
	if opts[0] != "file" && opts[0] != "dir" {
		return qerr.ValueError("invalid resource type option '" + opts[0] + "' in value '" + value + "'")
	}
	if mode, ok := parsePyIntBase8(opts[3]); !ok || mode < 0 || mode > 0o7777 {
		return qerr.ValueError("invalid mode option '" + opts[3] + "' in value '" + value + "'")
	}
	return nil
}

// parsePyIntBase8 is Python's int(s, 8) on printable ASCII: surrounding whitespace,
// a sign, an optional 0o prefix, octal digits with single underscores between them
// (and after the prefix). Values beyond 0o7777 are reported as 0o10000.
func parsePyIntBase8(s string) (int, bool) {
	s = strings.Trim(s, " \t\n\r\v\f")
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	if len(s) >= 2 && s[0] == '0' && (s[1] == 'o' || s[1] == 'O') {
		s = s[2:]
		if strings.HasPrefix(s, "_") {
			s = s[1:]
		}
	}
	if s == "" || s[0] == '_' || s[len(s)-1] == '_' || strings.Contains(s, "__") {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' {
			continue
		}
		if c < '0' || c > '7' {
			return 0, false
		}
		n = min(n*8+int(c-'0'), 0o10000)
	}
	if neg {
		n = -n
	}
	return n, true
}

// bootModeFeatureSide are the events of qubesd's handlers of domain-feature-set for
// the boot-mode features, when the value changed: boot-mode.active re-announces the
// qube's bootmode if it follows its default; boot-mode.appvm-default, on a template
// whose appvm_default_bootmode follows the feature, re-announces that and the bootmode
// of each qube based on it that follows its default.
func (m *Model) bootModeFeatureSide(d *config.Domain, name string) []Event {
	h := Holder{D: d}
	switch name {
	case "boot-mode.active":
		if _, set := d.Property("bootmode"); HasProperty(d.Class, "bootmode") && !set {
			return []Event{resetEvent(h, "bootmode")}
		}
	case "boot-mode.appvm-default":
		if _, set := d.Property("appvm_default_bootmode"); HasProperty(d.Class, "appvm_default_bootmode") && !set {
			return append([]Event{resetEvent(h, "appvm_default_bootmode")}, m.bootmodeFollowers(d)...)
		}
	}
	return nil
}

// validateFeature runs the checks qubesd's extensions make in their pre-set handlers;
// old is the current value, if hasOld.
func (m *Model) validateFeature(d *config.Domain, name, value, old string, hasOld bool) error {
	if svc, ok := strings.CutPrefix(name, "service."); ok {
		switch {
		case svc == "":
			return qerr.ValueError("Service name cannot be empty")
		case strings.Contains(svc, "/"):
			return qerr.ValueError("Service name cannot contain a slash")
		case svc == "." || svc == "..":
			return qerr.ValueError(`Service name cannot be "." or ".."`)
		case len(svc) > 48 && !strings.HasPrefix(svc, "app-dispvm."):
			return qerr.ValueError("Service name must not exceed 48 bytes")
		}
	}
	if name == "preload-dispvm-max" && HasProperty(d.Class, "template_for_dispvms") {
		if err := m.preloadMaxVeto(d, value); err != nil {
			return err
		}
	}
	// docs/spec/methods.md §4.1 lists the delay check on dom0 only; qubesd's
	// DVMTemplateMixin (qubes/vm/mix/dvmtemplate.py, AppVM and StandaloneVM) checks it
	// too. Both skip the check when the value is unchanged, count empty as "0" and
	// accept what Python's float() accepts.
	// dom0's handler (qubes/vm/adminvm.py) is the same.
	if name == "preload-dispvm-delay" && (HasProperty(d.Class, "template_for_dispvms") || d.Class == "AdminVM") && !(hasOld && old == value) {
		if value != "" && !isPyFloat(value) {
			return qerr.ValueError("Invalid preload-dispvm-delay value: not an integer or float")
		}
	}
	if d.Class == "AdminVM" && name == "preload-dispvm-threshold" && value != "" && !isDigits(value) {
		return qerr.ValueError("Invalid preload-dispvm-threshold value: not a digit")
	}
	return nil
}

// preloadMaxVeto is qubesd's domain-feature-pre-set:preload-dispvm-max handler of
// the qubes that can be disposable templates (DVMTemplateMixin, qubes/vm/mix/
// dvmtemplate.py: AppVM and StandaloneVM, whatever their template_for_dispvms). In
// order: qrexec (with the template's) must be truthy; so must the features
// supported-rpc.qubes.WaitForRunningSystem and …WaitForSession (supports_preload,
// the message names the missing ones); the value, empty
// counting as "0", must be digits. All QubesValueError, after the pre-set event.
func (m *Model) preloadMaxVeto(d *config.Domain, value string) error {
	if v, ok := m.CheckFeature(d, "qrexec", true, false, false); !ok || v == "" {
		return qerr.ValueError("Qube does not support qrexec")
	}
	var missing []string
	for _, service := range []string{"qubes.WaitForRunningSystem", "qubes.WaitForSession"} {
		if v, ok := m.CheckFeature(d, "supported-rpc."+service, true, false, false); !ok || v == "" {
			missing = append(missing, service)
		}
	}
	if len(missing) > 0 {
		return qerr.ValueError("Qube does not support the RPC(s) '" + strings.Join(missing, ", ") + "'")
	}
	if value != "" && !isDigits(value) {
		return qerr.ValueError("Invalid preload-dispvm-max value: not a digit")
	}
	return nil
}

// pyFloatRe is what Python's float() parses once the surrounding whitespace is
// stripped (feature values hold no whitespace but spaces): a sign, then decimal digits
// with single underscores between them, an optional point and exponent, or inf,
// infinity, nan in any case.
var pyFloatRe = regexp.MustCompile(`\A[+-]?(?:(?:[0-9](?:_?[0-9])*(?:\.(?:[0-9](?:_?[0-9])*)?)?|\.[0-9](?:_?[0-9])*)(?:[eE][+-]?[0-9](?:_?[0-9])*)?|(?i:inf|infinity|nan))\z`)

func isPyFloat(s string) bool { return pyFloatRe.MatchString(strings.Trim(s, " ")) }

// FeatureRemove plans admin.vm.feature.Remove.
func (m *Model) FeatureRemove(d *config.Domain, name string) (*Change, error) {
	if prohibitedFeatures[name] {
		return nil, featureProhibited()
	}
	ch := &Change{Pre: []Event{Ev(d.Name(), "domain-feature-pre-delete:"+name, "feature", name)}}
	if _, ok := Feature(d, name); !ok {
		ch.Err = FeatureNotFound(d.Name(), name)
		return ch, nil
	}
	ch.Ops = []config.Op{{Kind: config.OpDelFeature, Domain: d.ID, Name: name}}
	ch.Post = []Event{Ev(d.Name(), "domain-feature-delete:"+name, "feature", name)}
	if name == "preload-dispvm-max" {
		ch.Post = append(ch.Post, m.preloadStart(d, "deleted")...)
	}
	return ch, nil
}

// TagListText is tag.List's reply: sorted names.
func TagListText(d *config.Domain) string {
	tags := append([]string(nil), d.Tags...)
	sortStrings(tags)
	var b strings.Builder
	for _, t := range tags {
		b.WriteString(t)
		b.WriteByte('\n')
	}
	return b.String()
}

func tagProhibited(src, tag string) error {
	if strings.HasPrefix(tag, "created-by-") && src != "dom0" {
		return qerr.PermissionDenied("changing this tag is prohibited by qubes.ext.admin.AdminExtension")
	}
	return nil
}

// TagSet plans admin.vm.tag.Set from source src.
func (m *Model) TagSet(src string, d *config.Domain, tag string) (*Change, error) {
	if err := ValidateTag(tag); err != nil {
		return nil, err
	}
	if err := tagProhibited(src, tag); err != nil {
		return nil, err
	}
	ch := &Change{}
	if HasTag(d, tag) {
		return ch, nil // nothing fired, saved all the same
	}
	ch.Ops = []config.Op{{Kind: config.OpAddTag, Domain: d.ID, Name: tag}}
	if name, ok := strings.CutPrefix(tag, "created-by-"); ok {
		creator := m.Domain(name)
		if creator == nil {
			// qubesd's extensions look the creator up (after the tag was added in
			// memory) and crash, before any subscriber hears of the tag (issue 15,
			// class 8): refused here, with nothing taken.
			return nil, qerr.VMNotFoundError("No such domain: " + qerr.Repr(name))
		}
		if err := m.createdBySide(ch, d, creator); err != nil {
			return ch, nil
		}
	}
	ch.Post = append(ch.Post, Ev(d.Name(), "domain-tag-add:"+tag, "tag", tag))
	return ch, nil
}

// createdBySide are the handlers of domain-tag-add:created-by-…, which run before the
// event reaches a subscriber: the admin extension adds the creator's
// tag-created-vm-with tags, then the GUI extension sets guivm to the creator's
// set-created-guivm qube. An error (a guivm that is missing or cannot be set) is left
// in ch.Err and returned.
func (m *Model) createdBySide(ch *Change, d *config.Domain, creator *config.Domain) error {
	if with, ok := Feature(creator, "tag-created-vm-with"); ok {
		for _, t := range strings.Fields(with) {
			if ValidateTag(t) != nil || HasTag(d, t) || slices.ContainsFunc(ch.Ops, func(o config.Op) bool { return o.Kind == config.OpAddTag && o.Name == t }) {
				continue
			}
			ch.Ops = append(ch.Ops, config.Op{Kind: config.OpAddTag, Domain: d.ID, Name: t})
			ch.Post = append(ch.Post, Ev(d.Name(), "domain-tag-add:"+t, "tag", t))
		}
	}
	g, ok := Feature(creator, "set-created-guivm")
	if !ok || g == "" || !HasProperty(d.Class, "guivm") {
		return nil
	}
	var sub *Change
	err := error(nil)
	if m.Domain(g) == nil {
		// qubesd's extension crashes looking it up (issue 15, class 8).
		err = qerr.VMNotFoundError("No such domain: " + qerr.Repr(g))
	} else {
		sub, err = m.Set(Holder{D: d}, "guivm", []byte(g))
	}
	if err == nil {
		err = sub.Err
	}
	if err != nil {
		ch.Pre = ch.Post
		if sub != nil {
			ch.Pre = append(ch.Pre, sub.Pre...)
		}
		ch.Post, ch.Ops, ch.Err = nil, nil, err
		return err
	}
	ch.Post = append(append(ch.Post, sub.Pre...), sub.Post...)
	ch.Ops = append(ch.Ops, sub.Ops...)
	return nil
}

// TagRemove plans admin.vm.tag.Remove from source src.
func (m *Model) TagRemove(src string, d *config.Domain, tag string) (*Change, error) {
	if err := ValidateTag(tag); err != nil {
		return nil, err
	}
	if err := tagProhibited(src, tag); err != nil {
		return nil, err
	}
	if !HasTag(d, tag) {
		return nil, qerr.TagNotFoundError("Tag not set for domain " + d.Name() + ": " + tag)
	}
	return &Change{
		Ops:  []config.Op{{Kind: config.OpDelTag, Domain: d.ID, Name: tag}},
		Post: []Event{Ev(d.Name(), "domain-tag-delete:"+tag, "tag", tag)},
	}, nil
}
