package model

import (
	"regexp"
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
	if d.Class == "AdminVM" && name == "preload-dispvm-max" && !(hasOld && old == value) {
		if t := m.Ref(Global, "default_dispvm"); t != nil {
			ch.Pre = append(ch.Pre, Ev(t.Name(), "domain-feature-pre-set:"+name, kw...))
			if HasProperty(t.Class, "template_for_dispvms") {
				if ch.Err = m.preloadMaxVeto(t, value); ch.Err != nil {
					return ch, nil
				}
			}
		}
	}
	ch.Ops = []config.Op{{Kind: config.OpSetFeature, Domain: d.ID, Name: name, Value: value}}
	if !(hasOld && old == value) {
		ch.Post = m.bootModeFeatureSide(d, name)
	}
	ch.Post = append(ch.Post, Ev(d.Name(), "domain-feature-set:"+name, kw...))
	return ch, nil
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
	// too, skips the check when the value is unchanged, counts empty as "0" and accepts
	// what Python's float() accepts.
	if name == "preload-dispvm-delay" && HasProperty(d.Class, "template_for_dispvms") && !(hasOld && old == value) {
		if value != "" && !isPyFloat(value) {
			return qerr.ValueError("Invalid preload-dispvm-delay value: not an integer or float")
		}
	}
	if d.Class == "AdminVM" && value != "" {
		switch name {
		case "preload-dispvm-threshold":
			if !isDigits(value) {
				return qerr.ValueError("Invalid preload-dispvm-threshold value: not a digit")
			}
		case "preload-dispvm-delay":
			if !isNumber(value) {
				return qerr.ValueError("Invalid preload-dispvm-delay value: not an integer or float")
			}
		}
	}
	return nil
}

// preloadMaxVeto is qubesd's domain-feature-pre-set:preload-dispvm-max handler of
// the qubes that can be disposable templates (DVMTemplateMixin, qubes/vm/mix/
// dvmtemplate.py: AppVM and StandaloneVM, whatever their template_for_dispvms). In
// order: qrexec (with the template's) must be truthy; so must the feature
// supported-rpc.qubes.WaitForRunningSystem (supports_preload); the value, empty
// counting as "0", must be digits. All QubesValueError, after the pre-set event.
func (m *Model) preloadMaxVeto(d *config.Domain, value string) error {
	if v, ok := m.CheckFeature(d, "qrexec", true, false, false); !ok || v == "" {
		return qerr.ValueError("Qube does not support qrexec")
	}
	const service = "qubes.WaitForRunningSystem"
	if v, ok := m.CheckFeature(d, "supported-rpc."+service, true, false, false); !ok || v == "" {
		return qerr.ValueError("Qube does not support the RPC '" + service + "'")
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

func isNumber(s string) bool {
	s = strings.TrimPrefix(s, "-")
	whole, frac, _ := strings.Cut(s, ".")
	return (whole != "" || frac != "") && (whole == "" || isDigits(whole)) && (frac == "" || isDigits(frac))
}

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
	ch.Post = []Event{Ev(d.Name(), "domain-tag-add:"+tag, "tag", tag)}
	if creator, ok := strings.CutPrefix(tag, "created-by-"); ok && m.Domain(creator) == nil {
		// qubesd's extension looks the creator up after the tag was added in memory;
		// a missing one fails the call without saving.
		ch.NoSave = true
		ch.AbortAfter = qerr.Abort("created-by tag names a missing qube")
	}
	return ch, nil
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
